"""The training path's output layer and loss in one differentiable op: lm_head matmul, fp32 soft-cap,
cross-entropy with ignore index -1, per-token NLL out.

Same function as `token_nll(GPT(idx))` (SPEC §1 step 6: `z = x @ W` in the compute dtype, cast to fp32,
`s = cap * tanh(z / cap)`, `nll = logsumexp(s) - s[target]`), written with a hand-made VJP because autodiff of
that chain is the single largest cost of a step on a GPU: measured on an H100 (nanochat-d12, batch 32 x 2048,
vocab 32768) it moved six fp32 (B, T, V) tensors through memory and ran both backward GEMMs in fp32 (the
cotangent of an fp32 matmul output), 38% of the step. Here the forward keeps only z (compute dtype) and the
per-token logsumexp; the backward forms dz = g * (softmax(s) - onehot) * (1 - tanh^2) in one pass, in the
compute dtype, and runs both GEMMs in it. With fp32 compute (CPU) this is the same math as autodiff.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

F32 = jnp.float32


def _capped(z, cap: float):
    s = z.astype(F32)
    return cap * jnp.tanh(s / cap) if cap > 0 else s


def _logsumexp(s, cap: float):
    """logsumexp over the last axis. With a soft-cap, s lies in [-cap, cap], so cap is a safe shift
    (exp(s - cap) lies in [e^-2cap, 1]): one pass over the logits instead of a max pass then a sum pass (on an
    H100 XLA otherwise also writes the fp32 capped logits between the two passes)."""
    if cap > 0:
        return cap + jnp.log(jnp.sum(jnp.exp(s - cap), axis=-1))
    return jax.nn.logsumexp(s, axis=-1)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def head_nll(x, w, targets, cap: float, chunk: int = 0):
    """x (..., C) and w (C, V) in the compute dtype, int targets (...) (-1 = ignored) -> fp32 NLL (...)."""
    return _fwd(x, w, targets, cap, chunk)[0]


def _fwd(x, w, targets, cap, chunk):
    with jax.named_scope("lm_head"):
        z = jnp.matmul(x, w)  # the logits in the compute dtype, as nanochat (autocast) makes them
    with jax.named_scope("loss"):
        lse = _logsumexp(_capped(z, cap), cap)
        z_t = jnp.take_along_axis(z, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
        nll = jnp.where(targets >= 0, lse - _capped(z_t, cap), 0.0)
    return nll, (x, w, z, lse, targets)


def _bwd(cap, chunk, res, g):
    x, w, z, lse, targets = res
    with jax.named_scope("loss"):
        s = _capped(z, cap)
        g = jnp.where(targets >= 0, g, 0.0)[..., None]
        onehot = jnp.arange(z.shape[-1]) == targets[..., None]
        ds = (jnp.exp(s - lse[..., None]) - onehot) * g
        dz = (ds * (1.0 - jnp.square(s / cap)) if cap > 0 else ds).astype(z.dtype)  # tanh' = 1 - tanh^2
    with jax.named_scope("lm_head"):
        dx = jnp.matmul(dz, w.T).astype(x.dtype)
        dw = jnp.einsum("...c,...v->cv", x, dz).astype(w.dtype)
    return dx, dw, None


head_nll.defvjp(_fwd, _bwd)
