"""model/cpu_dots.py: matmuls whose forward and backward dots are canonical on the CPU (bf16 ones reach XLA:CPU's bf16
GEMMs), checked against a float64 numpy reference, forward and both gradients, and in the compiled HLO."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchat.model import cpu_dots

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the f32-result path is CPU-only")


def _bf16(a):
    return np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32), np.float64)


@pytest.mark.parametrize("k, n", [(16, 8), (8, 16)])  # dw copies g (x the wider) or x
def test_forward_and_grads_match_float64_reference(k, n):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    g = rng.standard_normal((2, 5, n)).astype(np.float32)
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


def test_float32_forward_and_grads_match_float64_reference():
    rng = np.random.default_rng(1)
    x, w, g = (rng.standard_normal(shape).astype(np.float32) for shape in ((3, 7, 16), (16, 24), (3, 7, 24)))
    y, vjp = jax.vjp(cpu_dots.matmul, jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(g))
    x64, w64, g64 = (a.astype(np.float64) for a in (x, w, g))
    for got, ref in ((y, x64 @ w64), (dx, g64 @ w64.T), (dw, np.einsum("btk,btn->kn", x64, g64))):
        assert got.dtype == jnp.float32 and np.abs(ref).max() > 1.0
        np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=1e-5, atol=1e-5)


def _contracting_dims(fn, dtype, k=32, n=16):
    """The (lhs, rhs) contracting dims of every dot in the compiled gradient of sum(fn(x, w)), x (64, k) w (k, n)."""
    x, w = jnp.ones((64, k), dtype), jnp.ones((k, n), dtype)
    grad = jax.jit(jax.grad(lambda x, w: jnp.sum(fn(x, w).astype(jnp.float32)), argnums=(0, 1)))
    hlo = grad.lower(x, w).compile().as_text()
    return sorted(re.findall(r"lhs_contracting_dims=\{(\d)\}, rhs_contracting_dims=\{(\d)\}", hlo))


@pytest.mark.parametrize("k, n", [(32, 16), (16, 32)])
def test_bf16_backward_dots_are_canonical(k, n):
    """Both bf16 backward dots contract lhs dim 1 with rhs dim 0 (their transposed operand was copied row-major
    first): autodiff of a plain matmul gives dw = dot(x, g) contracting dim 0 of both, which XLA:CPU upcasts."""
    assert _contracting_dims(cpu_dots.matmul, jnp.bfloat16, k, n) == [("1", "0")] * 2
    assert ("0", "0") in _contracting_dims(jnp.matmul, jnp.bfloat16)  # the check can fail


def test_f32_backward_dots_are_autodiffs():
    """In f32 no operand is copied: the dots are the ones autodiff makes (the copies cost more than they save)."""
    assert _contracting_dims(cpu_dots.matmul, jnp.float32) == _contracting_dims(jnp.matmul, jnp.float32)
    assert ("0", "0") in _contracting_dims(cpu_dots.matmul, jnp.float32)


def test_rounded_is_astype_bit_for_bit():
    """cpu_dots.rounded's integer round-to-nearest-even equals XLA's f32 -> bf16 convert on every value class: ties
    (to even), the largest finite values (to inf), subnormals, signed zeros and infinities; a NaN stays a NaN; and
    its derivative is astype's. Where the check could fail: dropping the tie term turns 1 + 3 * 2^-8 into 1 + 2^-7."""
    rng = np.random.default_rng(0)
    wide = rng.standard_normal(1 << 16) * np.exp(rng.uniform(-100, 85, 1 << 16))  # f32 subnormals to near its max
    special = [0.0, -0.0, np.inf, -np.inf, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-8 + 2**-20, 3.4028235e38,
               -3.39e38, 1e-40, -1e-45, 1.1754942e-38, 65504.0]
    x = np.concatenate([np.asarray(special), wide]).astype(np.float32)
    got = np.asarray(jax.jit(lambda v: cpu_dots.rounded(v, jnp.bfloat16))(x))
    want = np.asarray(jnp.asarray(x).astype(jnp.bfloat16))
    assert got.dtype == want.dtype and np.array_equal(got.view(np.uint16), want.view(np.uint16))
    assert float(got[4]) == 1.0 and float(got[5]) == 1.0 + 2**-6  # ties to even, both ways
    nans = np.array([0x7FC00000, 0x7F800001, 0xFF800001, 0x7F80FFFF], np.uint32).view(np.float32)
    assert np.isnan(np.asarray(cpu_dots.rounded(jnp.asarray(nans), jnp.bfloat16)).astype(np.float32)).all()
    d = jax.grad(lambda v: jnp.sum(cpu_dots.rounded(v, jnp.bfloat16).astype(jnp.float32) * 3.0))(jnp.ones(4))
    np.testing.assert_array_equal(np.asarray(d), np.full(4, 3.0, np.float32))
