"""RoPE and QK-norm of queries and keys, as one op: `rope_norm(x, cos, sin, eps=, scale=, impl=)`; and the
positions with their rotary tables, made once per forward for every layer (`positions` -> `Positions`).

nanochat applies rotary embeddings to q and k, then a parameter-free RMSNorm, then (here) the QK scale 1.2:

    r = rope(x);  y = r * rsqrt(mean(r^2) + eps) * scale        (computed in fp32, returned in x's dtype)

one fp32 expression with a single cast at the end (in bf16 the steps no longer round between them; in fp32 it
is the same arithmetic, op for op, as rotating, then normalizing, then scaling).

Implementations (`model.rope_norm`):
- `xla`: that line in jnp; its gradient by autodiff. Any device, training and decoding.
- `pallas`: one Pallas (Triton) GPU kernel per direction. Forward: each program normalizes and rotates a tile of
  rows (consecutive positions of one head), reading x once and writing y once; the backward is one more kernel
  with the gradient written out by hand (below), reading x and dy once. XLA's fusions of the same math take
  several passes over q and k (a reduction, the rotation, casts) in each direction. The model uses it for
  training and evaluation; KV-cache decoding always uses `xla`. Needs a CUDA GPU; tests run the same kernels
  in Pallas's interpreter on CPU.
- `auto`: `pallas` on CUDA GPUs where the shapes allow it (head dim a power of two >= 16, T a multiple of 16),
  else `xla`. Under a multi-device mesh the kernels are custom-partitioned over the batch, so each device runs
  them on its own rows (a bare pallas_call has no partitioning rule: XLA would gather its inputs).

Kernel math. A rotation keeps each (x1_i, x2_i) pair's length, so mean(r^2) = mean(x^2): the kernels take the
RMS from x. With s = scale * (mean(x^2) + eps)^(-1/2), y = s R x (R the rotation) and u = R^T dy:
    dx = s u - (s^3 / (scale^2 D)) (x . u) x
"""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxchat.config import ROPE_NORM_IMPLS, ConfigError
from jaxchat.dtypes import F32
from jaxchat.model.attention import cuda_compute_capability


def rope_tables(pos: jax.Array, head_dim: int, base: float, *, zero_from: int | None = None,
                rotate_half: bool = False) -> tuple[jax.Array, jax.Array]:
    """cos, sin of the rotary angles: (T, D/2) fp32, split-halves layout, inverse frequencies base^(-2i/D).

    marin's partial RoPE (`zero_from` = R/2 < D/2): the frequencies are base^(-2i/R) for the first R/2 slots and
    0 after, so those slots' pairs (i, i + D/2) pass through unrotated (cos 1, sin 0): R of the D dims rotate, and
    the tables stay (T, D/2), so the full-width path (and its kernel) serves it. `rotate_half`: Llama/HF's
    direction, y = (x1 cos - x2 sin, x2 cos + x1 sin), i.e. nanochat's with sin negated."""
    if zero_from is None:
        inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=F32) / head_dim)
    else:
        rotated = base ** (-jnp.arange(0, 2 * zero_from, 2, dtype=F32) / (2 * zero_from))
        inv_freq = jnp.concatenate([rotated, jnp.zeros((head_dim // 2 - zero_from,), F32)])
    angles = pos.astype(F32)[:, None] * inv_freq[None, :]
    return jnp.cos(angles), (-1.0 if rotate_half else 1.0) * jnp.sin(angles)


class Positions(NamedTuple):
    """The positions (T,) of a forward's tokens and their rotary tables cos, sin (T, D/2), made once per forward
    (`positions`) and shared by every layer."""
    pos: jax.Array
    cos: jax.Array
    sin: jax.Array


def positions(start, T: int, head_dim: int, base: float, *, zero_from: int | None = None,
              rotate_half: bool = False) -> Positions:
    """Positions start..start+T-1 with their tables (`rope_tables`; head_dim is the rotated width R for golf's
    partial RoPE). A Python int `start` (training and evaluation: 0) makes them
    all compile-time constants: computed while tracing, they enter the program once. Computed in the graph
    instead, XLA:CPU fused the (T, D/2) cos and sin into each RoPE consumer and evaluated them again for every
    batch row and head (~70 ms of a cpu-bench step). A traced `start` (the decode cursor) keeps them in the graph."""
    with jax.ensure_compile_time_eval() if isinstance(start, int) else contextlib.nullcontext():
        pos = start + jnp.arange(T)
        return Positions(pos, *rope_tables(pos, head_dim, base, zero_from=zero_from, rotate_half=rotate_half))


def model_positions(cfg, start, T: int) -> Positions:
    """`positions` for a ModelConfig: its rotated width, base, partial-RoPE form and rotation direction."""
    if cfg.rope_dims and cfg.rope_dims < cfg.head_dim and cfg.rope_partial == "zero_freqs":
        return positions(start, T, cfg.head_dim, cfg.rope_base, zero_from=cfg.rope_dims // 2,
                         rotate_half=cfg.rope_rotate_half)
    return positions(start, T, cfg.rotary_dims, cfg.rope_base, rotate_half=cfg.rope_rotate_half)


def rope(x, cos, sin):
    """Rotate the first R = 2 * cos.shape[-1] dims of x (..., T, N, D) in the split-halves layout, pairs (i, i + R/2),
    and pass the other D - R through (golf's partial RoPE; R = D is the full rotation)."""
    R = 2 * cos.shape[-1]
    c, s = cos[:, None, :], sin[:, None, :]
    x1, x2 = x[..., : R // 2], x[..., R // 2: R]
    return jnp.concatenate([x1 * c + x2 * s, -x1 * s + x2 * c, x[..., R:]], axis=-1)


def rms(x, eps):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def rope_norm_xla(x, cos, sin, *, eps: float, scale: float, norm_first: bool = False):
    """The reference: x (B, T, N, D), cos/sin (T, D/2) -> RMSNorm(rope(x)) * scale in fp32, returned in x's dtype.
    With cos/sin (T, R/2), R < D, only the first R dims rotate; `norm_first` normalises before rotating (golf's
    order: the same function, rounded differently)."""
    if norm_first or 2 * cos.shape[-1] != x.shape[-1]:
        xf = x.astype(F32)
        r = rope(rms(xf, eps), cos, sin) if norm_first else rms(rope(xf, cos, sin), eps)
        return (r * scale).astype(x.dtype) if scale != 1.0 else r.astype(x.dtype)
    x1, x2 = jnp.split(x.astype(F32), 2, axis=-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    r = jnp.concatenate([x1 * c + x2 * s, -x1 * s + x2 * c], axis=-1)
    # scale folds into the per-row factor: r * rsqrt(...) * scale would scale the whole tensor, and its cotangent,
    # by a broadcast constant that XLA:CPU materialises as a (B, T, N, D) operand of its fused reductions (this
    # op's backward at cpu-bench 2.0 -> 1.5 ms fp32, 3.3 -> 2.5 bf16; docs/LOG.md, session 13)
    return (r * (jax.lax.rsqrt(jnp.mean(r * r, axis=-1, keepdims=True) + eps) * scale)).astype(x.dtype)


def pallas_unsupported(x_shape, dtype) -> str | None:
    """Why the Pallas kernel cannot take (B, T, N, D) inputs of this dtype, or None when it can."""
    _, T, _, D = x_shape
    if D < 16 or D & (D - 1):
        return f"head_dim {D} is not a power of two >= 16"
    if T % 16:
        return f"sequence length {T} is not a multiple of 16"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(F32)):
        return f"dtype {jnp.dtype(dtype).name} is not bfloat16, float16 or float32"
    return None


def pallas_gpu_unavailable() -> str | None:
    """Why the Pallas GPU kernel cannot run in this process (no CUDA GPU), or None."""
    return "no CUDA GPU is visible to JAX" if cuda_compute_capability() is None else None


def resolve_impl(impl: str, x_shape, dtype) -> str:
    """The implementation `impl` ("auto", "xla", "pallas") means for these inputs on this machine."""
    if impl not in ROPE_NORM_IMPLS:
        raise ConfigError(f"model.rope_norm={impl!r} is not one of {', '.join(ROPE_NORM_IMPLS)}")
    if impl == "xla":
        return "xla"
    why = pallas_unsupported(x_shape, dtype) or pallas_gpu_unavailable()
    if impl == "auto":
        return "xla" if why else "pallas"
    if why:
        raise ConfigError(f"model.rope_norm=pallas cannot run here: {why}; use model.rope_norm=auto or xla")
    return "pallas"


def rope_norm(x, cos, sin, *, eps: float, scale: float, impl: str = "auto", norm_first: bool = False):
    """RoPE + QK-norm of x (B, T, N, D); cos/sin (T, R/2) are `rope_tables` of the T positions (R = D but for
    partial RoPE). Partial RoPE and `norm_first` run the xla form (the kernel rotates every dim, norm last)."""
    if norm_first or 2 * cos.shape[-1] != x.shape[-1]:
        return rope_norm_xla(x, cos, sin, eps=eps, scale=scale, norm_first=norm_first)
    if resolve_impl(impl, x.shape, x.dtype) == "pallas":
        return rope_norm_pallas(x, cos, sin, eps=eps, scale=scale)
    return rope_norm_xla(x, cos, sin, eps=eps, scale=scale)


# ---------------------------------------------------------------------------------------------------- Pallas


def _load_halves(ref):
    D = ref.shape[-1]
    return ref[:, : D // 2].astype(F32), ref[:, D // 2:].astype(F32)


def _scale_over_rms(x1, x2, eps, scale):
    """scale * rsqrt(mean(x^2) + eps) per row, from the row's two halves."""
    D = 2 * x1.shape[-1]
    ss = jnp.sum(x1 * x1, axis=-1, keepdims=True) + jnp.sum(x2 * x2, axis=-1, keepdims=True)
    return scale * jax.lax.rsqrt(ss / D + eps)


def _fwd_kernel(x_ref, cos_ref, sin_ref, y_ref, *, eps, scale):
    x1, x2 = _load_halves(x_ref)
    c, s = cos_ref[...], sin_ref[...]
    r = _scale_over_rms(x1, x2, eps, scale)
    half = x1.shape[-1]
    y_ref[:, :half] = ((x1 * c + x2 * s) * r).astype(y_ref.dtype)
    y_ref[:, half:] = ((x2 * c - x1 * s) * r).astype(y_ref.dtype)


def _bwd_kernel(x_ref, g_ref, cos_ref, sin_ref, dx_ref, *, eps, scale):
    x1, x2 = _load_halves(x_ref)
    g1, g2 = _load_halves(g_ref)
    c, s = cos_ref[...], sin_ref[...]
    r = _scale_over_rms(x1, x2, eps, scale)
    half = x1.shape[-1]
    u1, u2 = g1 * c - g2 * s, g1 * s + g2 * c  # R^T dy
    xu = jnp.sum(x1 * u1, axis=-1, keepdims=True) + jnp.sum(x2 * u2, axis=-1, keepdims=True)
    k = r * r * r / (scale * scale * 2 * half) * xu
    dx_ref[:, :half] = (r * u1 - k * x1).astype(dx_ref.dtype)
    dx_ref[:, half:] = (r * u2 - k * x2).astype(dx_ref.dtype)


def _call(kernel, rows: list, cos, sin, *, interpret: bool):
    """Run `kernel` over same-shaped (B, T, N, D) arrays `rows` and the (T, D/2) tables; the output has rows[0]'s
    shape and dtype. The rows are viewed as (B*T, N, D): program (i, n) takes bt consecutive positions of head n
    and the matching bt rows of the tables."""
    B, T, N, D = rows[0].shape
    bt = next(b for b in (64, 32, 16) if T % b == 0)
    row_spec = pl.BlockSpec((bt, pl.squeezed, D), lambda i, n: (i, n, 0))
    tab_spec = pl.BlockSpec((bt, D // 2), lambda i, n: (i % (T // bt), 0))
    out = pl.pallas_call(
        kernel, grid=(B * T // bt, N), in_specs=[row_spec] * len(rows) + [tab_spec, tab_spec], out_specs=row_spec,
        out_shape=jax.ShapeDtypeStruct((B * T, N, D), rows[0].dtype), interpret=interpret,
        name=kernel.func.__name__.strip("_"),
    )(*(a.reshape(B * T, N, D) for a in rows), cos, sin)
    return out.reshape(B, T, N, D)


def _single_device_op(kernel: str, eps: float, scale: float, interpret: bool):
    """The forward ("fwd": x, cos, sin) or backward ("bwd": x, dy, cos, sin) kernel as a function of arrays."""
    body = functools.partial(_fwd_kernel if kernel == "fwd" else _bwd_kernel, eps=eps, scale=scale)
    n_rows = 1 if kernel == "fwd" else 2
    return lambda *args: _call(body, list(args[:n_rows]), *args[n_rows:], interpret=interpret)


@functools.lru_cache(maxsize=None)
def _per_batch_shard(kernel: str, eps: float, scale: float, interpret: bool):
    """The kernel as an op XLA partitions over the batch: under a data-parallel mesh each device runs it on its
    own rows (the tables replicated), where a bare pallas_call, which has no partitioning rule, would have its
    inputs gathered onto every device. Any sharding of the other axes is undone first (jaxchat shards only the
    batch)."""
    run = _single_device_op(kernel, eps, scale, interpret)
    n_rows = 1 if kernel == "fwd" else 2

    def batch_sharded(mesh, arg):
        spec = getattr(arg.sharding, "spec", ())
        return NamedSharding(mesh, P(spec[0] if len(spec) else None))

    def infer(mesh, arg_shapes, result_shape):
        return batch_sharded(mesh, arg_shapes[0])

    def partition(mesh, arg_shapes, result_shape):
        rows, tables = batch_sharded(mesh, arg_shapes[0]), NamedSharding(mesh, P())
        return mesh, run, rows, (rows,) * n_rows + (tables, tables)

    op = custom_partitioning(run)
    op.def_partition(infer_sharding_from_operands=infer, partition=partition,
                     sharding_rule=", ".join(["b t n d"] * n_rows + ["t h", "t h"]) + " -> b t n d")
    return op


def _kernel_op(kernel: str, eps: float, scale: float, interpret: bool):
    """The kernel as called: a bare pallas_call on one device (nothing to partition; the path BENCHMARKS.md
    measured), batch-partitioned under a multi-device mesh."""
    if jax.device_count() > 1:
        return _per_batch_shard(kernel, eps, scale, interpret)
    return _single_device_op(kernel, eps, scale, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _rope_norm_kernel(x, cos, sin, eps, scale, interpret):
    return _kernel_op("fwd", eps, scale, interpret)(x, cos, sin)


def _rope_norm_kernel_fwd(x, cos, sin, eps, scale, interpret):
    return _rope_norm_kernel(x, cos, sin, eps, scale, interpret), (x, cos, sin)


def _rope_norm_kernel_bwd(eps, scale, interpret, res, g):
    x, cos, sin = res
    dx = _kernel_op("bwd", eps, scale, interpret)(x, g.astype(x.dtype), cos, sin)
    return dx, jnp.zeros_like(cos), jnp.zeros_like(sin)  # the tables are constants of the positions


_rope_norm_kernel.defvjp(_rope_norm_kernel_fwd, _rope_norm_kernel_bwd)


def rope_norm_pallas(x, cos, sin, *, eps: float, scale: float, interpret: bool = False):
    """The fused kernels (see the module docstring). `interpret=True` runs them in Pallas's interpreter (CPU
    tests); the model never does."""
    why = pallas_unsupported(x.shape, x.dtype)
    if why:
        raise ConfigError(f"model.rope_norm=pallas cannot take these inputs: {why}; use model.rope_norm=xla")
    return _rope_norm_kernel(x, cos.astype(F32), sin.astype(F32), float(eps), float(scale), bool(interpret))
