"""The training path's output layer and loss in one differentiable op: lm_head matmul, fp32 soft-cap,
cross-entropy with ignore index -1, per-token NLL out.

Same function as `token_nll(GPT(idx))` (SPEC §1 step 6: `z = x @ W` in the compute dtype, cast to fp32,
`s = cap * tanh(z / cap)`, `nll = logsumexp(s) - s[target]`), written with a hand-made VJP because autodiff of
that chain is the single largest cost of a step on a GPU: measured on an H100 (nanochat-d12, batch 32 x 2048,
vocab 32768) it moved six fp32 (B, T, V) tensors through memory and ran both backward GEMMs in fp32 (the
cotangent of an fp32 matmul output), 38% of the step. Here the forward keeps only z (compute dtype) and the
per-token logsumexp; the backward forms dz = g * (softmax(s) - onehot) * (1 - tanh^2) in one pass, in the
compute dtype, and runs both GEMMs in it. With fp32 compute (CPU) this is the same math as autodiff.

Loss kernels (`impl`, `model.loss_impl`): `xla` is the jnp code below. `pallas` (CUDA GPUs, soft-capped heads
without chunking) runs the soft-capped logsumexp and the logits' cotangent as two Pallas (Triton) kernels over
(rows, vocab) tiles, with tanh written as 1 - 2 / (1 + exp(2y)) (one exp and one division, ~1e-7 absolute from
tanh): on an H100 XLA's fusions of the same math ran at 1.8 TB/s, limited by the cost of its fp32 tanh rather than
by memory. The forward kernel writes per-tile partial sums (rows x V/tile), reduced by XLA. `auto` picks `pallas`
where it applies (one CUDA GPU: see rotary.pallas_gpu_unavailable).

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
from jax.experimental import pallas as pl

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


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def head_nll(x, w, targets, cap: float, chunk: int = 0, impl: str = "xla"):
    """x (..., C) and w (C, V) in the compute dtype, int targets (...) (-1 = ignored) -> fp32 NLL (...).

    cap (0: no soft-cap), chunk (tokens per chunk, 0: all at once) and impl (the loss kernels: "xla", "pallas", or
    "pallas_interpret" for tests on CPU; `resolve_loss_impl` turns `model.loss_impl` into one) are fixed at trace
    time; see the module docstring."""
    return _fwd(x, w, targets, cap, chunk, impl)[0]


def _fwd(x, w, targets, cap, chunk, impl):
    if chunk:
        return _fwd_chunked(x, w, targets, cap, chunk)
    with jax.named_scope("lm_head"):
        z = jnp.matmul(x, w)  # the logits in the compute dtype, as nanochat (autocast) makes them
    with jax.named_scope("loss"):
        nll, lse = _nll(z, targets, cap) if impl == "xla" else nll_pallas(z, targets, cap, impl == "pallas_interpret")
    return nll, (x, w, z, lse, targets)


def _bwd(cap, chunk, impl, res, g):
    if chunk:
        return _bwd_chunked(cap, chunk, res, g)
    x, w, z, lse, targets = res
    with jax.named_scope("loss"):
        # The barrier keeps XLA from sharing the forward's fp32 tanh(z / cap) with this recomputation (CSE):
        # shared, it was written out as an fp32 (N, V) tensor, 2x z's bytes, and read back here (measured on an
        # H100: +8 GiB peak memory and ~4 ms of the nanochat-d12 step at batch 32 x 2048).
        z = jax.lax.optimization_barrier(z)
        if impl == "xla":
            dz = _dz(z, lse, targets, g, cap)
        else:
            dz = dz_pallas(z, lse, targets, g, cap, impl == "pallas_interpret")
    with jax.named_scope("lm_head"):
        dx = jnp.matmul(dz, w.T).astype(x.dtype)
        dw = jnp.einsum("...c,...v->cv", x, dz).astype(w.dtype)
    return dx, dw, None


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
            z = jnp.matmul(x_c, w)
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

    def one(dw, chunk_res):
        x_c, t_c, lse_c, g_c = chunk_res
        with jax.named_scope("lm_head"):
            z = jnp.matmul(x_c, w)  # recomputed: the price of not saving the logits
        with jax.named_scope("loss"):
            dz = _dz(z, lse_c, t_c, g_c, cap)
        with jax.named_scope("lm_head"):
            dx_c = jnp.matmul(dz, w.T).astype(x.dtype)
            dw = dw + jnp.matmul(x_c.T, dz, preferred_element_type=F32)
        return dw, dx_c

    dw, dx = jax.lax.scan(one, jnp.zeros(w.shape, F32), (xs, ts, lse, gs))
    return dx.reshape(-1, x.shape[-1])[:n].reshape(x.shape), dw.astype(w.dtype), None


head_nll.defvjp(_fwd, _bwd)


# ------------------------------------------------------------------------------------------- Pallas loss kernels

_ROWS = 16  # rows (tokens) per tile


def _vocab_tile(V: int) -> int | None:
    return next((b for b in (512, 256, 128) if V % b == 0), None)


def pallas_unsupported(n_tokens: int, V: int, cap: float, chunk: int) -> str | None:
    """Why the Pallas loss kernels cannot take this head, or None when they can."""
    if cap <= 0:
        return "they need a soft-capped head (model.logit_softcap > 0)"
    if chunk:
        return "model.loss_chunk > 0 runs the chunked jnp head"
    if _vocab_tile(V) is None:
        return f"vocab_size {V} is not a multiple of 128"
    if n_tokens % _ROWS:
        return f"tokens per micro-batch {n_tokens} is not a multiple of {_ROWS}"
    return None


def resolve_loss_impl(impl: str, n_tokens: int, V: int, cap: float, chunk: int) -> str:
    """What `model.loss_impl` ("auto", "xla", "pallas") means for this head on this machine."""
    from jaxchat.config import LOSS_IMPLS, ConfigError
    from jaxchat.model.rotary import pallas_gpu_unavailable

    if impl not in LOSS_IMPLS:
        raise ConfigError(f"model.loss_impl={impl!r} is not one of {', '.join(LOSS_IMPLS)}")
    if impl == "xla":
        return "xla"
    why = pallas_unsupported(n_tokens, V, cap, chunk) or pallas_gpu_unavailable()
    if impl == "auto":
        return "xla" if why else "pallas"
    if why:
        raise ConfigError(f"model.loss_impl=pallas cannot run here: {why}; use model.loss_impl=auto or xla")
    return "pallas"


def _softcap_fast(z, cap: float):
    """cap * tanh(z / cap) as cap * (1 - 2 / (1 + exp(2 z / cap))): exp overflowing to inf gives +cap, and 0
    gives -cap, so no clamp is needed."""
    return cap * (1.0 - 2.0 / (1.0 + jnp.exp(z.astype(F32) * (2.0 / cap))))


def _nll_kernel(z_ref, t_ref, sum_ref, st_ref, *, cap: float):
    bv = z_ref.shape[-1]
    s = _softcap_fast(z_ref[...], cap)
    cols = pl.program_id(1) * bv + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
    sum_ref[...] = jnp.sum(jnp.exp(s - cap), axis=1)
    st_ref[...] = jnp.sum(jnp.where(cols == t_ref[...][:, None], s, 0.0), axis=1)


def _dz_kernel(z_ref, lse_ref, t_ref, g_ref, dz_ref, *, cap: float):
    bv = z_ref.shape[-1]
    s = _softcap_fast(z_ref[...], cap)
    cols = pl.program_id(1) * bv + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
    t = t_ref[...][:, None]
    g = jnp.where(t >= 0, g_ref[...][:, None], 0.0)
    p = jnp.exp(s - lse_ref[...][:, None])
    dz = (p - jnp.where(cols == t, 1.0, 0.0)) * g * (1.0 - jnp.square(s / cap))
    dz_ref[...] = dz.astype(dz_ref.dtype)


def _tiles(z):
    """(rows, V) flat logits -> grid, the (rows, vocab) tile spec, the per-row spec, the per-(row, tile) spec."""
    n, V = z.shape
    bv = _vocab_tile(V)
    grid = (n // _ROWS, V // bv)
    tile = pl.BlockSpec((_ROWS, bv), lambda i, j: (i, j))
    row = pl.BlockSpec((_ROWS,), lambda i, j: (i,))
    row_tile = pl.BlockSpec((_ROWS, pl.squeezed), lambda i, j: (i, j))
    return grid, tile, row, row_tile


def nll_pallas(z, targets, cap: float, interpret: bool = False):
    """The kernel version of `_nll`: z (..., V) logits, targets (...) -> (fp32 NLL, fp32 logsumexp), both (...)."""
    V = z.shape[-1]
    z2, t1 = z.reshape(-1, V), targets.reshape(-1).astype(jnp.int32)
    grid, tile, row, row_tile = _tiles(z2)
    part = jax.ShapeDtypeStruct((z2.shape[0], grid[1]), F32)
    sums, st = pl.pallas_call(partial(_nll_kernel, cap=float(cap)), grid=grid, in_specs=[tile, row],
                              out_specs=[row_tile, row_tile], out_shape=[part, part], interpret=interpret,
                              name="softcap_logsumexp")(z2, t1)
    lse = cap + jnp.log(jnp.sum(sums, axis=1))
    nll = jnp.where(t1 >= 0, lse - jnp.sum(st, axis=1), 0.0)
    return nll.reshape(targets.shape), lse.reshape(targets.shape)


def dz_pallas(z, lse, targets, g, cap: float, interpret: bool = False):
    """The kernel version of `_dz`: the logits' cotangent in z's dtype."""
    V = z.shape[-1]
    z2 = z.reshape(-1, V)
    grid, tile, row, _ = _tiles(z2)
    dz = pl.pallas_call(partial(_dz_kernel, cap=float(cap)), grid=grid, in_specs=[tile, row, row, row],
                        out_specs=tile, out_shape=jax.ShapeDtypeStruct(z2.shape, z.dtype), interpret=interpret,
                        name="softcap_xent_grad")(z2, lse.reshape(-1).astype(F32), targets.reshape(-1).astype(jnp.int32),
                                                  g.reshape(-1).astype(F32))
    return dz.reshape(z.shape)
