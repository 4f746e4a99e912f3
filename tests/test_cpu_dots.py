"""model/cpu_dots.py: bf16 matmuls with f32 results on the CPU (they reach XLA:CPU's bf16 GEMMs), checked against
a float64 numpy reference, forward and both gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchat.model import cpu_dots

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the f32-result path is CPU-only")


def _bf16(a):
    return np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32), np.float64)


def test_forward_and_grads_match_float64_reference():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 16)).astype(np.float32)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    g = rng.standard_normal((2, 5, 8)).astype(np.float32)
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    y, vjp = jax.vjp(cpu_dots.matmul, xb, wb)
    dx, dw = vjp(jnp.asarray(g, jnp.bfloat16))
    x64, w64, g64 = _bf16(x), _bf16(w), _bf16(g)  # the reference sees the same bf16-rounded inputs
    ref_y, ref_dx, ref_dw = x64 @ w64, g64 @ w64.T, np.einsum("btk,btn->kn", x64, g64)
    assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16
    for got, ref in ((y, ref_y), (dx, ref_dx), (dw, ref_dw)):
        assert np.abs(ref).max() > 1.0  # not a trivial comparison
        # f32 accumulation, one rounding to bf16: within bf16's half-ulp (2^-9 relative) of the exact result
        np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=2**-8, atol=1e-6)


def test_bf16_dot_is_not_upcast_in_compiled_hlo():
    x = jnp.ones((64, 32), jnp.bfloat16)
    w = jnp.ones((32, 16), jnp.bfloat16)
    hlo = jax.jit(cpu_dots.matmul).lower(x, w).compile().as_text()
    assert " dot(" in hlo, hlo
    # a plain bf16 jnp.matmul compiles to f32 copies of both operands (f32[64,32], f32[32,16]) and an f32 GEMM
    assert "f32[64,32]" not in hlo and "f32[32,16]" not in hlo, hlo


def test_float32_is_a_plain_matmul():
    x = jnp.ones((4, 3), jnp.float32)
    w = jnp.full((3, 2), 2.0, jnp.float32)
    assert not cpu_dots.wants_f32_result(jnp.float32)
    np.testing.assert_array_equal(np.asarray(cpu_dots.matmul(x, w)), np.full((4, 2), 6.0))
