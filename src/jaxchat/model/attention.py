"""Attention backends behind one function.

`attend(q, k, v, window=..., q_pos=..., k_pos=..., k_len=...)` is the seam every backend plugs into.
Shapes: q (B, T, H, D); k, v (B, S, K, D) with K dividing H (GQA: each kv head serves G = H/K query heads).
Positions are absolute token positions, so the same code serves training (q_pos == k_pos == arange(T)) and
KV-cache decoding (q_pos = cache_len + arange(T), k_pos = arange(S), keys at or beyond k_len are empty slots).

Masking: query at position t sees keys at positions t-w .. t (w+1 keys), where w is the layer's window.

Backends:
- `xla`: the reference; an explicit fp32 softmax over a (T, S) score matrix with a real sliding-window mask.
  Written with einsums so GQA never repeats K/V in memory.
The fast kernels (cuDNN flash attention on GPU, Pallas splash on TPU) are registered in `BACKENDS` the same way
once they exist; until then they are absent, and config validation names the ones that are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def window_mask(q_pos: jax.Array, k_pos: jax.Array, window: int, k_len: jax.Array | None = None) -> jax.Array:
    """Boolean (T, S) mask: True where query q_pos[t] may attend to key k_pos[s]."""
    dist = q_pos[:, None] - k_pos[None, :]  # how far back the key is
    mask = (dist >= 0) & (dist <= window)
    if k_len is not None:
        mask &= (k_pos < k_len)[None, :]
    return mask


def xla_attention(q, k, v, *, window: int, q_pos, k_pos, k_len=None):
    B, T, H, D = q.shape
    K = k.shape[2]
    G = H // K
    qg = q.reshape(B, T, K, G, D)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / jnp.sqrt(jnp.float32(D)))
    mask = window_mask(q_pos, k_pos, window, k_len)
    scores = jnp.where(mask[None, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    y = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return y.reshape(B, T, H, D)


BACKENDS = {"xla": xla_attention}


def attend(q, k, v, *, window: int, q_pos, k_pos, k_len=None, backend: str = "xla"):
    try:
        fn = BACKENDS[backend]
    except KeyError:
        raise ValueError(f"attention backend {backend!r} is not available: choose one of {sorted(BACKENDS)}") from None
    return fn(q, k, v, window=window, q_pos=q_pos, k_pos=k_pos, k_len=k_len)
