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
micro-batch: z saved for the backward, then dz and the fp32 temporaries that form it. Chunked, the tokens are
flattened to (N, C) and run `chunk` at a time under `lax.scan`, so only one (chunk, V) block of logits exists at
once, and the forward already forms the gradients: each chunk's dz for a unit cotangent on every token, then
dx_c = dz_c @ W^T and dW += x_c^T dz_c (summed in fp32), while the chunk's logits are fresh. The backward
scales them by the cotangent g. dx scales row by row, so that is exact for any g; dW is a sum over tokens, so
it holds only where g is the same on every counted token, which is what a summed or mean loss gives (the train
step, TTT). For any other g (a weighted loss) the backward recomputes each chunk's logits and forms dW with the
real g (`lax.cond`: one branch runs). N is padded up to a multiple of the chunk with ignored targets (-1), which
contribute nothing; a chunk larger than N is cut to N. Without gradients (evaluation) only the NLL is formed.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from jaxchat.dtypes import F32
from jaxchat.model import cpu_dots


def _logits(z, dtype):
    """z as fp32 logits, rounded to the compute dtype as nanochat's (autocast) matmul makes them: a no-op when z is
    already in it. The chunked head hands in the GEMM's fp32 result, so the rounding happens inside the passes that
    read the logits instead of in a pass of its own."""
    return cpu_dots.rounded(z, dtype).astype(F32)


def _nll(z, targets, cap: float, dtype):
    """Logits z (..., V) -> (fp32 NLL (...), fp32 logsumexp (...)); target -1 gives NLL 0.

    With a soft-cap, s = cap * t (t = tanh(z / cap)) lies in [-cap, cap], so cap is a safe shift for the
    logsumexp: exp(s - cap) lies in [e^-2cap, 1], one pass over the logits instead of a max pass then a sum pass.
    The shifted logit s - cap is written (t - 1) / (1 / cap), a division by a constant, which XLA:CPU fuses into
    its YNNPACK reduction with t as the only input. As cap * t - cap, XLA writes s in a pass of its own first (the
    product is shared with the backward's), and as (t - 1) * cap it writes the broadcast constant out as a
    (tokens, vocab) array: one more pass over each chunk's logits either way (the head alone at cpu-bench, this
    and `_logits` together: fp32 335 -> 321 ms, bf16 190 -> 176; docs/LOG.md, session 13). 1 / cap rounds to
    within 2e-8 (relative) of it, far inside the rounding of the sum itself."""
    z_t = _logits(jnp.take_along_axis(z, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0], dtype)
    if cap > 0:
        lse = cap + jnp.log(jnp.sum(jnp.exp((jnp.tanh(_logits(z, dtype) / cap) - 1.0) / (1.0 / cap)), axis=-1))
        s_t = cap * jnp.tanh(z_t / cap)
    else:
        lse, s_t = jax.nn.logsumexp(_logits(z, dtype), axis=-1), z_t
    return jnp.where(targets >= 0, lse - s_t, 0.0), lse


def _dz(z, lse, targets, g, cap: float, dtype):
    """Cotangent of the logits in `dtype`: g * (softmax(s) - onehot) * (1 - t^2); zero where target is -1."""
    g = jnp.where(targets >= 0, g, 0.0)[..., None]
    onehot = jnp.arange(z.shape[-1]) == targets[..., None]
    if cap <= 0:
        return cpu_dots.rounded((jnp.exp(_logits(z, dtype) - lse[..., None]) - onehot) * g, dtype)
    t = jnp.tanh(_logits(z, dtype) / cap)
    ds = (jnp.exp(cap * t - lse[..., None]) - onehot) * g
    return cpu_dots.rounded(ds * (1.0 - jnp.square(t)), dtype)  # tanh' = 1 - t^2


CPU_CHUNK = 1024  # `auto` on a CPU


def resolve_chunk(chunk: int) -> int:
    """`model.loss_chunk` as tokens per chunk (0: all at once). -1 (auto) is CPU_CHUNK on a CPU, else 0: with the
    gradients formed in the forward, the chunked head does the batch's three GEMMs one chunk at a time, and no
    (N, V) tensor goes through memory (cpu-bench on 2 AMD EPYC cores: bf16 614 -> 576-595 ms, fp32 999 -> 939-949;
    docs/LOG.md, session 12)."""
    if chunk >= 0:
        return chunk
    return CPU_CHUNK if cpu_dots.on_cpu() else 0


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def head_nll(x, w, targets, cap: float, chunk: int = 0):
    """x (..., C) and w (C, V) in the compute dtype, int targets (...) (-1 = ignored) -> fp32 NLL (...).

    cap (0: no soft-cap) and chunk (tokens per chunk, 0: all at once; see the module docstring) are Python
    numbers fixed at trace time."""
    return _nll_chunked(x, w, targets, cap, chunk) if chunk else _fwd(x, w, targets, cap, chunk)[0]


def _fwd(x, w, targets, cap, chunk):
    if chunk:
        return _fwd_chunked(x, w, targets, cap, chunk)
    with jax.named_scope("lm_head"):
        z = cpu_dots.matmul(x, w)  # the logits in the compute dtype, as nanochat (autocast) makes them
    with jax.named_scope("loss"):
        nll, lse = _nll(z, targets, cap, z.dtype)
    return nll, (x, w, z, lse, targets)


def _bwd(cap, chunk, res, g):
    if chunk:
        return _bwd_chunked(cap, chunk, res, g)
    x, w, z, lse, targets = res
    with jax.named_scope("loss"):
        dz = _dz(z if share_softcap_with_forward() else jax.lax.optimization_barrier(z), lse, targets, g, cap, z.dtype)
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


def _chunks(x, targets, chunk: int):
    """(N tokens, tokens per chunk, x as (k, chunk, C), targets as (k, chunk)), the last chunk padded with ignored
    tokens."""
    n, chunk = _chunk_size(targets, chunk)
    return n, chunk, _chunked(x.reshape(n, x.shape[-1]), chunk, 0), _chunked(targets.reshape(n), chunk, -1)


def _nll_chunked(x, w, targets, cap, chunk):
    """The chunked head without gradients (evaluation): per-token NLL."""
    n, chunk, xs, ts = _chunks(x, targets, chunk)

    def one(xt):
        with jax.named_scope("lm_head"):
            z = cpu_dots.dot(xt[0], w, F32)  # rounded to x.dtype inside the loss's passes
        with jax.named_scope("loss"):
            return _nll(z, xt[1], cap, x.dtype)[0]

    return jax.lax.map(one, (xs, ts)).reshape(-1)[:n].reshape(targets.shape)


def _fwd_chunked(x, w, targets, cap, chunk):
    """NLL, and already the gradients for a unit cotangent on every token (the train step's summed loss): each
    chunk's dz is formed while its logits are fresh, so no logits are kept and none recomputed."""
    nll, dx1, dw1 = _chunk_grads(x, w, targets, jnp.ones(targets.shape, F32), cap, chunk)
    return nll, (x, w, targets, dx1, dw1)


def _bwd_chunked(cap, chunk, res, g):
    """dx scales row by row with g (a token's dz is linear in its own cotangent); dW is a sum over tokens, so the
    forward's dW holds only when g is the same on every counted token (a summed or mean loss). For any other g
    (a weighted loss) the chunks' logits are recomputed and dW formed with the real g."""
    x, w, targets, dx1, dw1 = res
    valid = targets >= 0
    g_hi = jnp.max(jnp.where(valid, g, -jnp.inf))
    g_lo = jnp.min(jnp.where(valid, g, jnp.inf))
    any_valid = jnp.any(valid)
    g_all = jnp.where(any_valid, g_hi, 0.0)

    def scaled(_):
        dx = (dx1.astype(F32) * jnp.where(valid, g, 0.0)[..., None]).astype(x.dtype)
        return dx, (dw1 * g_all).astype(w.dtype)

    def recomputed(_):
        return _recompute_grads(x, w, targets, g, cap, chunk)

    dx, dw = jax.lax.cond((g_hi == g_lo) | ~any_valid, scaled, recomputed, None)
    return dx, dw, None


def _recompute_grads(x, w, targets, g, cap, chunk):
    """dx and dW for any per-token cotangent g, each chunk's logits recomputed (one more head GEMM)."""
    _, dx, dw = _chunk_grads(x, w, targets, g, cap, chunk)
    return dx, dw.astype(w.dtype)


def _chunk_grads(x, w, targets, g, cap, chunk):
    """One pass over the chunks for a per-token cotangent g: (NLL, dx in x's dtype, dW summed in fp32). Each
    chunk: z = x_c @ W, its NLL and dz, then dx_c = dz @ W^T and dW += x_c^T dz."""
    n, chunk, xs, ts = _chunks(x, targets, chunk)
    gs = _chunked(g.reshape(n), chunk, 0)
    w_t = _transposed(w)

    def one(dw, chunk_in):
        x_c, t_c, g_c = chunk_in
        with jax.named_scope("lm_head"):
            z = cpu_dots.dot(x_c, w, F32)  # rounded to x.dtype inside the loss's passes
        with jax.named_scope("loss"):
            nll, lse = _nll(z, t_c, cap, x.dtype)
            dz = _dz(z, lse, t_c, g_c, cap, x.dtype)
        with jax.named_scope("lm_head"):
            dx_c = cpu_dots.dot(dz, w_t, x.dtype)
            dw = dw + jnp.matmul(_transposed(x_c, copy_f32=True), dz, preferred_element_type=F32)
        return dw, (nll, dx_c)

    dw, (nll, dx) = jax.lax.scan(one, jnp.zeros(w.shape, F32), (xs, ts, gs))
    return (nll.reshape(-1)[:n].reshape(targets.shape), dx.reshape(-1, x.shape[-1])[:n].reshape(x.shape), dw)


def _transposed(a, copy_f32: bool = False):  # canonical dots on a CPU (cpu_dots.py)
    return cpu_dots.transposed(a, copy_f32=copy_f32) if cpu_dots.on_cpu() else a.T


head_nll.defvjp(_fwd, _bwd)
