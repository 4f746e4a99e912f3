"""Matmuls in a low-precision compute dtype on XLA:CPU, written so they reach the CPU's bf16 units.

XLA:CPU (jax 0.10.2) compiles a `bf16 x bf16 -> bf16` dot as: convert both operands to f32, an f32 GEMM, convert
the result back; only a dot whose result is f32 (`preferred_element_type=float32`) stays a bf16 YNNPACK GEMM
(AMX / AVX512-BF16). At cpu-bench's lm_head shape ([4096, 256] x [256, 8192]) that is 108.7 ms vs 46.8 ms, torch's
bf16 mm 46.6 (docs/LOG.md, cpuspeed). `matmul` asks for the f32 result and rounds it to the compute dtype, which is
what the upcast path computes anyway (f32 accumulation, one rounding), in the forward and, through its VJP, in
both backward dots (autodiff alone would transpose into f32-cotangent dots, upcast again). Used only on the CPU
backend and for sub-f32 dtypes; elsewhere it is a plain `jnp.matmul`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32


def wants_f32_result(dtype) -> bool:
    return jnp.dtype(dtype) != jnp.dtype(F32) and jax.default_backend() == "cpu"


@jax.custom_vjp
def _matmul_f32_result(x, w):
    return jnp.matmul(x, w, preferred_element_type=F32).astype(x.dtype)


def _fwd(x, w):
    return _matmul_f32_result(x, w), (x, w)


def _bwd(res, g):
    x, w = res
    g = g.astype(x.dtype)
    dx = jnp.matmul(g, w.T, preferred_element_type=F32).astype(x.dtype)
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    dw = jnp.matmul(x2.T, g2, preferred_element_type=F32).astype(w.dtype)
    return dx, dw


_matmul_f32_result.defvjp(_fwd, _bwd)


def matmul(x, w):
    """x (..., K) @ w (K, N), both already in the compute dtype."""
    return _matmul_f32_result(x, w) if wants_f32_result(x.dtype) else jnp.matmul(x, w)
