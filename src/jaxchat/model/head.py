"""The training path's output layer and loss in one differentiable op: lm_head matmul, fp32 soft-cap,
cross-entropy with ignore index -1, per-token NLL out.

Same function as `token_nll(GPT(idx))` (docs/architecture.md §Forward step 6: `z = x @ W` in the compute dtype, cast
to fp32, `s = cap * tanh(z / cap)`, `nll = logsumexp(s) - s[target]`), written with a hand-made VJP because autodiff
of that chain is the single largest cost of a step on a GPU: measured on an H100 (nanochat-d12, batch 32 x 2048,
vocab 32768) it moved six fp32 (B, T, V) tensors through memory and ran both backward GEMMs in fp32 (the cotangent
of an fp32 matmul output), 38% of the step. Here the forward keeps only z (compute dtype) and the per-token
logsumexp; the backward forms dz = g * (softmax(s) - onehot) * (1 - tanh^2) in one pass, in the compute dtype, and
runs both GEMMs in it. With fp32 compute (CPU) this is the same math as autodiff.

Chunked (`chunk > 0`, `model.loss_chunk`): even fused, the head holds (N, V) logits for all N tokens of the
micro-batch: z saved for the backward, then dz and the fp32 temporaries that form it. When that is the memory
limit, the tokens are flattened to (N, C) and run `chunk` at a time under `lax.scan`, so only one (chunk, V)
block of logits exists at once. The forward saves x, W, the targets and the per-token logsumexp, not z; the
backward recomputes each chunk's z = x_c @ W and forms dz_c, dx_c = dz_c @ W^T and dW += x_c^T dz_c (summed
in fp32 across chunks). The price is one extra forward GEMM of the head in the backward (2NCV more FLOPs: the
head's three GEMMs become four) and smaller, sequential GEMMs; the saving is O((N - chunk) V) of activation
memory. N is padded up to a multiple of the chunk with ignored targets (-1), which contribute nothing; a chunk
larger than N is cut to N.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from jaxchat.dtypes import F32
from jaxchat.model import cpu_dots


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


def _nll(z, targets, cap: float):
    """Logits z (..., V) in the compute dtype -> (fp32 NLL (...), fp32 logsumexp (...)); target -1 gives NLL 0."""
    lse = _logsumexp(_capped(z, cap), cap)
    z_t = jnp.take_along_axis(z, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(targets >= 0, lse - _capped(z_t, cap), 0.0), lse


def _dz(z, lse, targets, g, cap: float):
    """Cotangent of the logits, in z's dtype: g * (softmax(s) - onehot) * (1 - tanh^2); zero where target is -1."""
    s = _capped(z, cap)
    g = jnp.where(targets >= 0, g, 0.0)[..., None]
    onehot = jnp.arange(z.shape[-1]) == targets[..., None]
    ds = (jnp.exp(s - lse[..., None]) - onehot) * g
    return (ds * (1.0 - jnp.square(s / cap)) if cap > 0 else ds).astype(z.dtype)  # tanh' = 1 - tanh^2


CPU_CHUNK = 1024  # `auto` on a CPU computing in bf16


def resolve_chunk(chunk: int, dtype) -> int:
    """`model.loss_chunk` as tokens per chunk (0: all at once). -1 (auto) is CPU_CHUNK on a CPU computing in a
    low-precision dtype, else 0: there each chunk's logits stay in cache and the chunked head made the bf16 step
    6-10% faster (cpu-bench 436 -> 411 ms, `tiny` 186 -> 169), where in fp32 it was 5% slower (the extra head GEMM
    costs more than the cache saves; docs/LOG.md, session 11)."""
    if chunk >= 0:
        return chunk
    return CPU_CHUNK if cpu_dots.wants_f32_result(dtype) else 0


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def head_nll(x, w, targets, cap: float, chunk: int = 0):
    """x (..., C) and w (C, V) in the compute dtype, int targets (...) (-1 = ignored) -> fp32 NLL (...).

    cap (0: no soft-cap) and chunk (tokens per chunk, 0: all at once; see the module docstring) are Python
    numbers fixed at trace time."""
    return _fwd(x, w, targets, cap, chunk)[0]


def _fwd(x, w, targets, cap, chunk):
    if chunk:
        return _fwd_chunked(x, w, targets, cap, chunk)
    with jax.named_scope("lm_head"):
        z = cpu_dots.matmul(x, w)  # the logits in the compute dtype, as nanochat (autocast) makes them
    with jax.named_scope("loss"):
        nll, lse = _nll(z, targets, cap)
    return nll, (x, w, z, lse, targets)


def _bwd(cap, chunk, res, g):
    if chunk:
        return _bwd_chunked(cap, chunk, res, g)
    x, w, z, lse, targets = res
    with jax.named_scope("loss"):
        dz = _dz(z if share_softcap_with_forward() else jax.lax.optimization_barrier(z), lse, targets, g, cap)
    with jax.named_scope("lm_head"):
        if cpu_dots.on_cpu():  # XLA:CPU's fast GEMMs need canonical dots (cpu_dots.py)
            dx, dw = cpu_dots.grads(x, w, dz)
        else:
            dx = jnp.matmul(dz, w.T).astype(x.dtype)
            dw = jnp.einsum("...c,...v->cv", x, dz).astype(w.dtype)
    return dx, dw, None


def share_softcap_with_forward() -> bool:
    """Whether XLA may reuse the forward's fp32 tanh(z / cap) in the backward (common-subexpression elimination
    across the custom VJP) instead of recomputing it from z. Shared, it is stored as an fp32 (N, V) tensor, twice
    z's bytes: on an H100 (nanochat-d12, batch 32 x 2048) it was 8.6 GB written and read back, ~4 GiB of peak
    memory (37.74 -> 33.7 GiB without it) and the loss forward took 4.37 ms instead of 2.49, so on accelerators
    an optimization barrier on z forces the recomputation. On a CPU the transcendental is the cost and memory is
    plentiful: the barrier there, together with the RoPE/QK-norm RMS taken from x, made the shared CPU benchmark
    config ~5% slower (3,250 -> 3,080 tok/s), and undoing both restored its speed (docs/LOG.md, session 3)."""
    return jax.default_backend() == "cpu"


def _chunked(a, chunk: int, fill):
    """(N, ...) -> (ceil(N / chunk), chunk, ...), the last chunk padded with `fill`."""
    n = a.shape[0]
    k = -(-n // chunk)
    a = jnp.pad(a, [(0, k * chunk - n)] + [(0, 0)] * (a.ndim - 1), constant_values=fill)
    return a.reshape(k, chunk, *a.shape[1:])


def _chunk_size(targets, chunk: int) -> tuple[int, int]:
    """(N tokens, tokens per chunk): a chunk larger than the batch is cut to N rather than padded."""
    n = math.prod(targets.shape)
    return n, min(chunk, n)


def _fwd_chunked(x, w, targets, cap, chunk):
    n, chunk = _chunk_size(targets, chunk)
    xs = _chunked(x.reshape(n, x.shape[-1]), chunk, 0)
    ts = _chunked(targets.reshape(n), chunk, -1)

    def one(xt):
        x_c, t_c = xt
        with jax.named_scope("lm_head"):
            z = cpu_dots.dot(x_c, w, x.dtype)
        with jax.named_scope("loss"):
            return _nll(z, t_c, cap)

    nll, lse = jax.lax.map(one, (xs, ts))
    return nll.reshape(-1)[:n].reshape(targets.shape), (x, w, lse, targets)


def _bwd_chunked(cap, chunk, res, g):
    x, w, lse, targets = res
    n, chunk = _chunk_size(targets, chunk)
    xs = _chunked(x.reshape(n, x.shape[-1]), chunk, 0)
    ts = _chunked(targets.reshape(n), chunk, -1)
    gs = _chunked(g.reshape(n), chunk, 0)
    w_t = cpu_dots.transposed(w) if cpu_dots.on_cpu() else w.T  # canonical dots on a CPU (cpu_dots.py)

    def one(dw, chunk_res):
        x_c, t_c, lse_c, g_c = chunk_res
        with jax.named_scope("lm_head"):
            z = cpu_dots.dot(x_c, w, x.dtype)  # recomputed: the price of not saving the logits
        with jax.named_scope("loss"):
            dz = _dz(z, lse_c, t_c, g_c, cap)
        with jax.named_scope("lm_head"):
            dx_c = cpu_dots.dot(dz, w_t, x.dtype)
            x_t = cpu_dots.transposed(x_c) if cpu_dots.on_cpu() else x_c.T
            dw = dw + jnp.matmul(x_t, dz, preferred_element_type=F32)
        return dw, dx_c

    dw, dx = jax.lax.scan(one, jnp.zeros(w.shape, F32), (xs, ts, lse, gs))
    return dx.reshape(-1, x.shape[-1])[:n].reshape(x.shape), dw.astype(w.dtype), None


head_nll.defvjp(_fwd, _bwd)
