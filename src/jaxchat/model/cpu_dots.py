"""Matmuls written so XLA:CPU runs them on its fast GEMM paths: `matmul(x, w)` and the backward dots of the head;
and `rounded`, the f32 -> bf16 rounding their results (and the model's other bf16 outputs) take on a CPU.

XLA:CPU (jax 0.10.2, YNNPACK GEMMs) is fast only for *canonical* dots: lhs (M, K) and rhs (K, N), both row-major in
memory. Two things fall off that path (docs/LOG.md, session 11; `benchmarks/cpu_gemm.py` measures both):
- A bf16 dot whose result is bf16 is compiled as convert both operands to f32, an f32 GEMM, convert back; only a
  dot with an f32 result (`preferred_element_type=float32`) stays a bf16 GEMM (AMX / AVX512-BF16). So the forward
  asks for the f32 result and rounds it, which is what the upcast path computes anyway (f32 accumulation, one
  rounding).
- The backward dots autodiff makes, dx = g @ w^T and dw = x^T @ g, contract a transposed operand. XLA folds the
  transpose into the dot's dimension numbers, so the GEMM reads a column-major operand: in bf16 that dot is upcast
  to f32 as above (in f32 it costs little: dw 61 -> 55 ms at the lm_head shape, the MLP's within noise). Here the
  small operand (w, or x for dw) is transposed into a new row-major array first (`transposed`), and the
  dot is canonical. bf16 at cpu-bench's lm_head shapes ([4096, 256] x [256, 8192]): dx 54 -> 11 ms, dw 72 -> 21;
  at the MLP's: dx 6.3 -> 1.5 ms, dw 7.8 -> 2.4 (`benchmarks/cpu_gemm.py`, BENCHMARKS.md).

XLA:CPU's f32 -> bf16 convert is slow inside a fused loop, so `rounded` writes it as integer round-to-nearest-even
on the bits (the same bits; docs/LOG.md, session 13).

Used only on the CPU backend (elsewhere `matmul` is a plain `jnp.matmul` and autodiff makes the backward, and
`rounded` is `astype`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

F32 = jnp.float32
MATMUL_NAME = "cpu_matmul"  # its output's tag: remat's `dots` policies save it like a plain dot's (model/remat.py)


def on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def wants_f32_result(dtype) -> bool:
    """Whether a dot in `dtype` must ask for an f32 result to stay on XLA:CPU's low-precision GEMM path."""
    return jnp.dtype(dtype) != jnp.dtype(F32) and on_cpu()


def transposed(a, *, copy_f32: bool = False):
    """a (..., M, N) -> (..., N, M) as a dot operand. In a low-precision dtype on a CPU: a new row-major array (a
    plain transpose is only a layout change, XLA would hand the dot a column-major view and upcast it; flattening
    pins the layout to row-major, the barrier keeps XLA from folding the transpose back into the dot). In f32 a
    plain transpose: XLA folds it into the dot at little cost, and the copies cost more (175 of 1,076 ms of kernel
    time in a cpu-bench step; docs/LOG.md, session 11). `copy_f32` copies in f32 too, where a dot is large enough
    to repay it: the head's dW per chunk (x_c^T (256, 1024) @ dz (1024, 8192) at cpu-bench: 25.8 ms folded, on
    Eigen, against 21.7 ms copied, on YNNPACK; the fp32 step 0.987-0.990x; docs/LOG.md, session 16)."""
    t = jnp.swapaxes(a, -1, -2)
    if not (wants_f32_result(a.dtype) or (copy_f32 and on_cpu())):
        return t
    return jax.lax.optimization_barrier(t.reshape(-1)).reshape(t.shape)


def dot(a, b, out_dtype):
    """Canonical a (M, K) @ b (K, N) -> out_dtype, accumulated in f32 on the low-precision GEMM path."""
    result = F32 if wants_f32_result(a.dtype) else None
    return rounded(jnp.matmul(a, b, preferred_element_type=result), out_dtype)


def rounded(x, dtype):
    """x.astype(dtype), bit for bit. On a CPU, f32 -> bf16 is written out as integer round-to-nearest-even on the
    bits: XLA:CPU's own convert costs about as much as an exp inside a fused loop (an exp pass over 8M values with
    a bf16 result: 2.9 ms with the convert, 2.0 with this; docs/LOG.md, session 13)."""
    if x.dtype == F32 and jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16) and on_cpu():
        return _bf16_rne(x)
    return x.astype(dtype)


@jax.custom_jvp
def _bf16_rne(x):
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    top = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16  # round half to even into the upper 16 bits
    top = jnp.where(bits & 0x7FFFFFFF > 0x7F800000, 0x7FC0, top)  # NaN stays NaN (the carry could make it inf)
    return jax.lax.bitcast_convert_type(top.astype(jnp.uint16), jnp.bfloat16)


_bf16_rne.defjvp(lambda primals, tangents: (_bf16_rne(primals[0]), tangents[0].astype(jnp.bfloat16)))


def grads(x, w, g):
    """The two backward dots of y = x @ w for a cotangent g (..., N): (dx (..., K), dw (K, N)), each canonical.

    dw contracts over the tokens, so one of x and g is copied transposed. Where that copy is made (low precision)
    and x is the wider one (K > N: the MLP's c_proj), dw^T = g^T x copies g instead and transposes the weight-sized
    result: bitwise the same dw, at c_proj's cpu-bench shape in bf16 13.9 -> 13.3 ms for both dots."""
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    dx = dot(g, transposed(w), x.dtype)
    if wants_f32_result(x.dtype) and x2.shape[-1] > g2.shape[-1]:
        dw = dot(transposed(g2), x2, w.dtype).T
    else:
        dw = dot(transposed(x2), g2, w.dtype)
    return dx, dw


@jax.custom_vjp
def _cpu_matmul(x, w):
    return dot(x, w, x.dtype)


def _fwd(x, w):
    return _cpu_matmul(x, w), (x, w)


def _bwd(res, g):
    x, w = res
    return grads(x, w, g.astype(x.dtype))


_cpu_matmul.defvjp(_fwd, _bwd)


def matmul(x, w):
    """x (..., K) @ w (K, N), both already in the compute dtype."""
    return checkpoint_name(_cpu_matmul(x, w), MATMUL_NAME) if on_cpu() else jnp.matmul(x, w)
