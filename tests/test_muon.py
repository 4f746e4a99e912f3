"""Muon (optim/muon.py) against float64 numpy references written here in PyTorch's (out, in) orientation, the
orientation nanochat's formulas are stated in; our kernels are the transposes.

Tolerances:
- fp32 Polar Express vs float64: entries are O(0.3); fp32 unit roundoff is 6e-8 and the 5 steps chain 15
  matmuls of length <= 160, so entry errors of ~1e-6 are expected (measured <= 1.5e-6 on CPU and H100);
  bound 1e-5. A matrix of such errors has a spectral norm ~sqrt(n) = 10x larger (measured <= 1.02e-5);
  bound 3e-5. Singular values are then compared with Weyl's bound: |s_i(A) - s_i(B)| <= ||A - B||_2.
- bf16 Polar Express vs float64: every step rounds A, B and X to bf16 (unit roundoff u = 2^-8); 5 steps x 3
  roundings accumulate to at most ~15u = 5.9% relative (Frobenius) to first order (measured 4.1%). Singular
  values may leave the exact band by the spectral norm of that error; measured <= 1.6u, bound 4u.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jaxchat.optim.muon import POLAR_EXPRESS_COEFFS, lr_factor, muon, normuon, polar_express, second_moment_shape

U_BF16 = 2.0**-8

# nanochat's Polar Express coefficients, copied from karpathy/nanochat@92d63d4 nanochat/optim.py
# (`polar_express_coeffs`: num_iters=5, safety_factor=2e-2, cushion=2), the reference the module is checked against.
NANOCHAT_POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def pe_ref(W, steps=5):
    """nanochat's Polar Express in float64 on a PyTorch (out, in) matrix."""
    X = W / (1.01 * np.linalg.norm(W) + 1e-6)
    for a, b, c in NANOCHAT_POLAR_EXPRESS_COEFFS[:steps]:
        if X.shape[0] > X.shape[1]:  # tall
            A = X.T @ X
            X = a * X + X @ (b * A + c * A @ A)
        else:
            A = X @ X.T
            X = a * X + (b * A + c * A @ A) @ X
    return X


def poly(s):
    """The scalar map the 5 steps apply to each singular value."""
    for a, b, c in NANOCHAT_POLAR_EXPRESS_COEFFS:
        s = a * s + b * s**3 + c * s**5
    return s


def band():
    s = np.geomspace(1e-3, 1.0, 400001)
    y = poly(s)
    return y.min(), y.max()


def spread_matrix(rng, n_in, n_out, ratio=60.0):
    """(in, out) kernel with singular values log-spread over [1, ratio]."""
    r = min(n_in, n_out)
    U, _ = np.linalg.qr(rng.standard_normal((n_in, r)))
    V, _ = np.linalg.qr(rng.standard_normal((n_out, r)))
    return (U * rng.permutation(np.geomspace(1.0, ratio, r))) @ V.T


def gaussian_matrix(rng, n_in, n_out):
    """A Gaussian kernel; square ones get a random orthogonal shift (a square Gaussian's smallest singular
    value is ~0, below the 1e-3 the band is promised for)."""
    G = rng.standard_normal((n_in, n_out))
    if n_in == n_out:
        G += 2 * np.sqrt(n_in) * np.linalg.qr(rng.standard_normal((n_in, n_in)))[0]
    return G


SHAPES = [(48, 160), (160, 48), (96, 96)]  # (in, out): PyTorch tall, wide, square


def test_coefficients_are_nanochats_exactly():
    """The module's table equals nanochat's digit for digit (a one-digit change moves the 5-step polynomial by up
    to 0.026 on [1e-3, 1] but the band endpoints by only ~3e-11, so the band check alone cannot see it)."""
    assert POLAR_EXPRESS_COEFFS == NANOCHAT_POLAR_EXPRESS_COEFFS


def test_band_of_the_coefficients():
    lo, hi = band()
    assert lo == pytest.approx(0.858873, abs=1e-6) and hi == pytest.approx(1.141127, abs=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_polar_express_fp32_matches_float64_and_stays_in_band(shape):
    rng = np.random.default_rng(sum(shape))
    lo, hi = band()
    outs = []
    for K in (gaussian_matrix(rng, *shape), spread_matrix(rng, *shape)):
        s_in = np.linalg.svd(K / (1.01 * np.linalg.norm(K)), compute_uv=False)
        assert s_in.min() >= 1e-3  # inside the range the band is promised for
        ours = np.asarray(polar_express(jnp.asarray(K, jnp.float32), 5, jnp.float32), np.float64)
        ref = pe_ref(K.T).T
        assert np.abs(ref).max() > 0.1 and np.abs(ours - K).max() > 0.1  # non-trivial on both sides
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)
        spec = np.linalg.norm(ours - ref, 2)
        assert spec < 3e-5
        # Weyl: singular values move by at most the spectral norm of the difference; ref's are p(s_in)
        s_out = np.linalg.svd(ours, compute_uv=False)
        np.testing.assert_allclose(np.sort(s_out), np.sort(poly(s_in)), rtol=0, atol=spec + 1e-9)
        assert lo - spec <= s_out.min() and s_out.max() <= hi + spec
        outs.append(s_out)
    # the spread matrix reaches both edges of the band: the band is tight, not just satisfied
    assert outs[1].min() < lo + 2e-3 and outs[1].max() > hi - 2e-3


def test_polar_express_below_band_premise_is_not_lifted():
    """A singular value below 1e-3 is mapped by p, not into the band: the premise of the band matters."""
    rng = np.random.default_rng(1)
    U, _ = np.linalg.qr(rng.standard_normal((32, 32)))
    V, _ = np.linalg.qr(rng.standard_normal((32, 32)))
    s = np.full(32, 1.0)
    s[0] = 1e-4 * np.sqrt(31) * 1.01
    s_in = s[0] / (1.01 * np.linalg.norm(s) + 1e-6)
    assert 0.9e-4 < s_in < 1.1e-4
    out = np.asarray(polar_express(jnp.asarray((U * s) @ V.T, jnp.float32), 5, jnp.float32))
    s_out = np.linalg.svd(out, compute_uv=False)
    assert s_out.min() == pytest.approx(poly(s_in), rel=1e-3) and s_out.min() < 0.2


@pytest.mark.parametrize("shape", SHAPES)
def test_polar_express_bf16_within_rounding_of_float64(shape):
    rng = np.random.default_rng(7 + sum(shape))
    lo, hi = band()
    K = spread_matrix(rng, *shape)
    ours = np.asarray(polar_express(jnp.asarray(K, jnp.float32), 5, jnp.bfloat16), np.float64)
    ref = pe_ref(K.T).T
    rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    assert 0 < rel < 15 * U_BF16
    s_out = np.linalg.svd(ours, compute_uv=False)
    assert lo - 4 * U_BF16 <= s_out.min() and s_out.max() <= hi + 4 * U_BF16


def muon_ref(params, grads, lr_fn, mom_fn, wd_fn, beta2=0.9, factor=True, cautious=True):
    """nanochat's muon_step_fused (momentum, Polar Express, NorMuon, cautious update) in float64 numpy, on
    W = K^T (out, in). Returns the final kernels (in, out)."""
    W = {k: v.T.astype(np.float64) for k, v in params.items()}
    M = {k: np.zeros_like(w) for k, w in W.items()}
    V = {k: np.zeros((w.shape[0], 1) if w.shape[0] >= w.shape[1] else (1, w.shape[1])) for k, w in W.items()}
    for t, g in enumerate(grads):
        lr, mom, wd = lr_fn(t), mom_fn(t), wd_fn(t)
        for k, w in W.items():
            G = g[k].T.astype(np.float64)
            M[k] = M[k] + (1 - mom) * (G - M[k])
            X = pe_ref(G + mom * (M[k] - G))
            red = -1 if w.shape[0] >= w.shape[1] else -2
            v_mean = (X**2).mean(axis=red, keepdims=True)
            v_norm = np.sqrt(v_mean.sum() * X.shape[red])
            V[k] = V[k] + (1 - beta2) * (v_mean - V[k])
            step = 1 / np.sqrt(np.maximum(V[k], 1e-10))
            v_norm_new = np.sqrt((v_mean * X.shape[red] * step**2).sum())
            X = X * step * (v_norm / max(v_norm_new, 1e-10))
            eff = lr * (np.sqrt(max(1.0, w.shape[0] / w.shape[1])) if factor else 1.0)
            mask = (X * w >= 0) if cautious else np.ones_like(w)
            W[k] = w - eff * X - eff * wd * w * mask
    return {k: w.T for k, w in W.items()}


@pytest.fixture(scope="module")
def muon_run():
    rng = np.random.default_rng(3)
    shapes = {"c_fc": (16, 64), "c_proj": (64, 16), "c_q": (16, 16), "c_k": (16, 16), "ve_gate": (12, 2)}
    params = {k: rng.standard_normal(s).astype(np.float32) * 0.3 for k, s in shapes.items()}
    grads = [{k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()} for _ in range(3)]
    lr_fn = lambda t: 0.02 * (1 + t) / 3  # noqa: E731
    mom_fn = lambda t: 0.85 + 0.05 * t  # noqa: E731
    wd_fn = lambda t: 0.5 - 0.1 * t  # noqa: E731 (large, so the cautious mask shows)
    tx = muon(lr_fn, mom_fn, wd_fn, ns_dtype=jnp.float32)
    p = {k: jnp.asarray(v) for k, v in params.items()}
    state = tx.init(p)
    step = jax.jit(tx.update)
    for g in grads:
        u, state = step({k: jnp.asarray(v) for k, v in g.items()}, state, p)
        p = jax.tree.map(lambda a, b: a + b, p, u)
    return dict(params=params, grads=grads, fns=(lr_fn, mom_fn, wd_fn), ours=p, state=state)


def test_full_transformation_matches_numpy_reference(muon_run):
    r = muon_run
    ref = muon_ref(r["params"], r["grads"], *r["fns"])
    variants = {"no lr factor": muon_ref(r["params"], r["grads"], *r["fns"], factor=False),
                "plain decay": muon_ref(r["params"], r["grads"], *r["fns"], cautious=False)}
    for k, p0 in r["params"].items():
        d_ref, d_ours = ref[k] - p0, np.asarray(r["ours"][k], np.float64) - p0
        scale = np.linalg.norm(d_ref)
        assert scale > 1e-2
        assert np.linalg.norm(d_ours - d_ref) / scale < 2e-5, k  # fp32 vs float64 (measured <= 4e-6)
        # the reference is sensitive to each feature under test (c_fc for the factor, all for the mask)
        for name, var in variants.items():
            gap = np.linalg.norm(var[k] - ref[k]) / scale
            if name == "no lr factor" and k != "c_fc":
                assert gap == 0.0, (k, name)
            else:
                assert gap > 1e-2, (k, name)


def test_state_shapes_and_leaves(muon_run):
    st = muon_run["state"]
    assert int(st.count) == 3
    assert st.second_moment["c_fc"].shape == (1, 64)  # out >= in: one value per output row
    assert st.second_moment["c_proj"].shape == (64, 1)  # out < in: one per input column
    assert st.second_moment["ve_gate"].shape == (12, 1)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(st))


def test_lr_factor_and_moment_shapes():
    assert lr_factor((768, 3072)) == 2.0 and lr_factor((3072, 768)) == 1.0 and lr_factor((12, 6)) == 1.0
    assert second_moment_shape((32, 32)) == (1, 32) and second_moment_shape((5, 32, 8)) == (5, 32, 1)


def test_normuon_keeps_the_frobenius_norm_and_equalises_rows():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((24, 40)) * np.linspace(0.2, 3.0, 40), jnp.float32)  # uneven columns
    y, v = normuon(x, jnp.zeros((1, 40)), 0.9)
    assert float(jnp.linalg.norm(y)) == pytest.approx(float(jnp.linalg.norm(x)), rel=1e-5)
    col = np.asarray(jnp.sqrt(jnp.mean(y**2, axis=0)))
    assert np.std(np.asarray(jnp.sqrt(jnp.mean(x**2, axis=0)))) > 0.5 and np.std(col) < 1e-4
    assert np.allclose(np.asarray(v), 0.1 * np.asarray(jnp.mean(x**2, axis=0, keepdims=True)), rtol=1e-6)


def test_stacked_equals_unstacked():
    rng = np.random.default_rng(9)
    p = {f"w{i}": jnp.asarray(rng.standard_normal((16, 24)), jnp.float32) for i in range(3)}
    g = {k: jnp.asarray(rng.standard_normal((16, 24)), jnp.float32) for k in p}
    outs = []
    for stack in (True, False):
        tx = muon(0.02, 0.9, 0.1, ns_dtype=jnp.float32, stack=stack)
        outs.append(jax.jit(tx.update)(g, tx.init(p), p)[0])
    for k in p:
        assert float(jnp.abs(outs[0][k]).max()) > 1e-3
        np.testing.assert_allclose(outs[0][k], outs[1][k], rtol=1e-5, atol=1e-7)


def test_rejects_non_matrices_and_missing_params():
    with pytest.raises(ValueError, match="2-D"):
        muon(0.02).init({"bias": jnp.zeros((4,))})
    tx = muon(0.02)
    p = {"w": jnp.ones((4, 4))}
    with pytest.raises(ValueError, match="params"):
        tx.update(p, tx.init(p))
