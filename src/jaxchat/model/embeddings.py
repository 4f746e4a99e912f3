"""What the model adds to the token embedding (docs/architecture.md §Forward and §Golf): golf's BigramHash, and the
two smears, each mixing the previous token's embedding into the current one.

- BigramHash (parameter-golf PR #334): bucket `h_t = (36313 tok_t + 27191 tok_{t-1}) mod B` for t >= 1 and
  `h_0 = 0` (position 0 of the *sequence*, so decoding passes the cache's previous token and position); an
  embedding (B, d_b), a projection d_b -> C when d_b != C, times a learned scalar `scale`. The hash is taken in
  int32 with both factors reduced mod B first, which equals the reference's int64 arithmetic mod B for
  B <= 32768 (config.BIGRAM_MAX_BUCKETS).
- nanochat's smear: `x_t += smear_lambda * sigmoid(x_t[:24] W_s) * e_{t-1}`, position 0 unchanged.
- golf's SmearGate v1: `x_t = (1 - g) x_t + g e_{t-1}`, `g = sigmoid(gate)` per dim, `e_{-1} = 0`.

e_{t-1} is the previous token's normed embedding (bigram included) for both smears: the only thing decoding has
to carry across calls besides the previous token id. With both on, v1 runs first, then nanochat's (its gate reads
the v1 output); each alone is its reference exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxchat.dtypes import F32
from jaxchat.model.mlp import Dense

BIGRAM_P1, BIGRAM_P2 = 36313, 27191


def bigram_hash(idx, prev_tok, pos, buckets: int):
    """Bucket of each (previous, current) token pair: idx (B, T) int, prev_tok (B,) the token before idx[:, 0]
    (ignored where pos == 0), pos (T,) absolute positions -> (B, T) int32, 0 at position 0."""
    idx = idx.astype(jnp.int32)
    prev = jnp.concatenate([prev_tok.astype(jnp.int32)[:, None], idx[:, :-1]], axis=1)
    h = ((BIGRAM_P1 % buckets) * (idx % buckets) + (BIGRAM_P2 % buckets) * (prev % buckets)) % buckets
    return jnp.where((pos > 0)[None, :], h, 0)


class BigramHash(nnx.Module):
    """embed (B, d_b), proj d_b -> C (None when d_b == C), scalar scale; values set by the init scheme."""

    def __init__(self, buckets: int, dim: int, C: int):
        self.buckets = buckets
        self.embed = nnx.Param(jnp.zeros((buckets, dim), F32))
        self.proj = Dense(dim, C) if dim != C else None
        self.scale = nnx.Param(jnp.zeros((), F32))

    def __call__(self, idx, prev_tok, pos):
        h = jnp.take(self.embed[...], bigram_hash(idx, prev_tok, pos, self.buckets), axis=0)
        if self.proj is not None:
            h = self.proj(h)
        return h * self.scale[...]


def previous(x, first_prev):
    """x (B, T, C) shifted right by one: row t holds x_{t-1}, row 0 holds first_prev (B, C)."""
    return jnp.concatenate([first_prev[:, None].astype(x.dtype), x[:, :-1]], axis=1)


def smear_v1(x, prev, gate, pos):
    """golf's SmearGate: (1 - g) x + g prev per dim, prev = 0 at position 0."""
    g = jax.nn.sigmoid(gate.astype(x.dtype))
    prev = jnp.where((pos > 0)[None, :, None], prev, 0)
    return (1 - g) * x + g * prev


def smear_nanochat(x, prev, gate_fn, lam, channels: int, pos):
    """nanochat's smear: x + lam * sigmoid(gate_fn(x[:channels])) * prev, position 0 unchanged."""
    mix = lam.astype(x.dtype) * jax.nn.sigmoid(gate_fn(x[..., :channels], x.dtype)) * prev
    return x + jnp.where((pos > 0)[None, :, None], mix, 0)
