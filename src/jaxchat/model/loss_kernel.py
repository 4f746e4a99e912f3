"""The loss and the logits' cotangent in one Pallas (Triton) GPU kernel, for the fused head (model/head.py).

The head's XLA path forms the NLL from the logits z in the forward and dz = (softmax(s) - onehot) * (1 - tanh^2)
(s = cap * tanh(z / cap)) in the backward: each pass reads all N x V logits (4.3 GB per nanochat-d12 micro-batch
of 32 x 2048 in bf16) and the backward writes dz as well. `nll_and_dz` does both in the forward, for a unit
cotangent per token: each program holds one row of z in registers, so the row is read from memory once, and
writes the row's NLL and its dz. The head's backward then has only to scale rows by the cotangent g, which it
folds into its GEMMs (dx = g * (dz @ W^T), dW = (g * x)^T dz); z is neither kept nor read again.

    model.loss_kernel = xla      the head's jnp code (model/head.py)
                        pallas   this kernel (CUDA GPUs; V a power of two from 128 to 65536)
                        auto     xla

Measured on an H100 (session 6, docs/LOG.md): correct (NLL bitwise equal to the xla head's, gradients to 3e-5),
but not faster where it counts. The head alone (d12 shapes, forward + backward): xla 20.12 ms, the best tuning
19.10 ms; whole rows in registers 60.4 ms at 4 warps (spilled), 21.3-22.0 ms at 8-32. The nanochat-d12 step
(32 x 8 x 2048): 916.1 ms against 915.4 ms with the xla loss. Kept as benchmarks/patches/loss_kernel.patch.

Pallas's interpreter runs the kernel on CPU for the tests (`interpret=True`); the model never does.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxchat.config import ConfigError

F32 = jnp.float32


def pallas_unsupported(n_tokens: int, vocab: int, dtype) -> str | None:
    """Why the kernel cannot take (n_tokens, vocab) logits of this dtype, or None when it can."""
    if vocab < 128 or vocab > 65536 or vocab & (vocab - 1):
        return f"the vocabulary ({vocab}) is not a power of two from 128 to 65536"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(F32)):
        return f"dtype {jnp.dtype(dtype).name} is not bfloat16, float16 or float32"
    return None


def resolve_impl(impl: str, n_tokens: int, vocab: int, dtype) -> str:
    """The implementation `impl` ("auto", "xla", "pallas") means for these logits on this machine."""
    if impl == "xla" or impl == "auto":
        return "xla"
    from jaxchat.model.rotary import pallas_gpu_unavailable

    why = (pallas_unsupported(n_tokens, vocab, dtype) or pallas_gpu_unavailable()
           or ("it runs on one device (no partitioning rule yet)" if jax.device_count() > 1 else None))
    if why:
        raise ConfigError(f"model.loss_kernel=pallas cannot run here: {why}; use model.loss_kernel=xla")
    return "pallas"


@dataclass(frozen=True)
class Tuning:
    """How the kernel splits the work: `rows` rows of z per program; `block` columns per load (None: the whole
    row, held in registers and read from memory once; otherwise two passes over the row, the second reading it
    again); Triton's `num_warps` per program."""

    rows: int = 1
    block: int | None = None
    num_warps: int = 4


TUNING = Tuning(rows=1, block=2048, num_warps=4)  # the fastest on an H100 (benchmarks/loss_kernel_tuning.py)


def _capped(z, cap: float):
    """(s, tanh(z / cap) or None) in fp32."""
    if cap > 0:
        th = jnp.tanh(z / cap)
        return cap * th, th
    return z, None


def _dz(s, th, onehot, lse, keep, cap: float, dtype):
    ds = jnp.exp(s - lse[:, None]) - onehot.astype(F32)
    if cap > 0:
        ds = ds * (1.0 - th * th)
    return jnp.where(keep[:, None], ds, 0.0).astype(dtype)


def _row_kernel(z_ref, t_ref, nll_ref, dz_ref, *, cap: float):
    """Whole rows: z (R, V) -> nll (R,), dz (R, V) = (softmax(s) - onehot) * ds/dz; zero where the target is -1."""
    t = t_ref[...]  # (R,) int32
    s, th = _capped(z_ref[...].astype(F32), cap)
    m = jnp.full(t.shape, cap, F32) if cap > 0 else jnp.max(s, axis=1)  # with a cap, s <= cap: a safe shift
    lse = m + jnp.log(jnp.sum(jnp.exp(s - m[:, None]), axis=1))
    onehot = jnp.arange(s.shape[1], dtype=jnp.int32)[None, :] == t[:, None]
    s_t = jnp.sum(jnp.where(onehot, s, 0.0), axis=1)
    keep = t >= 0
    dz_ref[...] = _dz(s, th, onehot, lse, keep, cap, dz_ref.dtype)
    nll_ref[...] = jnp.where(keep, lse - s_t, 0.0)


def _block_kernel(z_ref, t_ref, nll_ref, dz_ref, *, cap: float, block: int):
    """The same in two passes over `block`-column slices of the rows: the log-sum-exp (online max without a cap)
    and the target's logit, then dz."""
    t = t_ref[...]
    cols = jnp.arange(block, dtype=jnp.int32)[None, :]
    n_blocks = z_ref.shape[1] // block

    def load(j):
        return _capped(z_ref[:, pl.ds(j * block, block)].astype(F32), cap)

    def first(j, carry):
        m, total, s_t = carry
        s, _ = load(j)
        m_new = m if cap > 0 else jnp.maximum(m, jnp.max(s, axis=1))
        total = total * jnp.exp(m - m_new) + jnp.sum(jnp.exp(s - m_new[:, None]), axis=1)
        s_t = s_t + jnp.sum(jnp.where(cols + j * block == t[:, None], s, 0.0), axis=1)
        return m_new, total, s_t

    zeros = jnp.zeros(t.shape, F32)
    m0 = jnp.full(t.shape, cap if cap > 0 else -jnp.inf, F32)
    m, total, s_t = jax.lax.fori_loop(0, n_blocks, first, (m0, zeros, zeros))
    lse = m + jnp.log(total)
    keep = t >= 0

    def second(j, carry):
        s, th = load(j)
        dz_ref[:, pl.ds(j * block, block)] = _dz(s, th, cols + j * block == t[:, None], lse, keep, cap, dz_ref.dtype)
        return carry

    jax.lax.fori_loop(0, n_blocks, second, 0)
    nll_ref[...] = jnp.where(keep, lse - s_t, 0.0)


def _call(z, targets, *, cap: float, interpret: bool, tuning: Tuning):
    N, V = z.shape
    R = tuning.rows
    block = tuning.block if tuning.block and tuning.block < V else None
    kernel = (functools.partial(_block_kernel, cap=cap, block=block) if block
              else functools.partial(_row_kernel, cap=cap))
    row = pl.BlockSpec((R, V), lambda i: (i, 0))
    tok = pl.BlockSpec((R,), lambda i: (i,))
    return pl.pallas_call(
        kernel, grid=(N // R,), in_specs=[row, tok], out_specs=[tok, row],
        out_shape=[jax.ShapeDtypeStruct((N,), F32), jax.ShapeDtypeStruct((N, V), z.dtype)],
        compiler_params=plgpu.CompilerParams(num_warps=tuning.num_warps), interpret=interpret, name="nll_and_dz",
    )(z, targets)


def nll_and_dz(z, targets, *, cap: float, interpret: bool = False):
    """Logits z (..., V) in the compute dtype and int targets (...) (-1 = ignored) -> (fp32 NLL (...), dz (..., V)
    in z's dtype): the NLL of the soft-capped logits (cap 0: none) and its gradient with respect to z for a
    cotangent of 1 per token. Not differentiable itself: it is the head's forward (model/head.py)."""
    V = z.shape[-1]
    n = z.size // V
    why = pallas_unsupported(n, V, z.dtype)
    if why:
        raise ConfigError(f"model.loss_kernel=pallas cannot take these logits: {why}; use model.loss_kernel=xla")
    tuning = TUNING
    if n % tuning.rows or (tuning.block and V % tuning.block):
        raise ConfigError(f"loss kernel tuning {tuning} does not divide {n} tokens x vocabulary {V}")
    nll, dz = _call(z.reshape(n, V), targets.reshape(n).astype(jnp.int32), cap=float(cap), interpret=interpret,
                    tuning=tuning)
    return nll.reshape(targets.shape), dz.reshape(z.shape)
