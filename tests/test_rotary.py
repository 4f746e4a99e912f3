"""RoPE + QK-norm (model/rotary.py): the jnp op against an independent numpy statement of nanochat's two steps
(rotate, then RMS-normalize, then scale), and the Pallas kernels (forward and hand-written backward) against the
jnp op's autodiff, in Pallas's interpreter on CPU and compiled on a CUDA GPU."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import child_env
from jaxchat.config import ConfigError
from jaxchat.model.rotary import resolve_impl, rope_norm, rope_norm_pallas, rope_norm_xla, rope_tables

EPS, SCALE, BASE = 2.0**-23, 1.2, 100000.0


def numpy_rope_then_norm(x, base=BASE, eps=EPS, scale=SCALE):
    """nanochat's order, in float64: rotate the split halves by position, then RMSNorm, then scale."""
    x = np.asarray(x, np.float64)
    T, D = x.shape[1], x.shape[-1]
    inv = base ** (-np.arange(0, D, 2) / D)
    ang = np.arange(T)[:, None] * inv[None, :]
    c, s = np.cos(ang)[None, :, None, :], np.sin(ang)[None, :, None, :]
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    y = np.concatenate([x1 * c + x2 * s, -x1 * s + x2 * c], axis=-1)
    return scale * y / np.sqrt(np.mean(y * y, axis=-1, keepdims=True) + eps)


def inputs(B=2, T=48, N=3, D=32, dtype=jnp.float32, seed=0):
    x = 3.0 * jax.random.normal(jax.random.key(seed), (B, T, N, D), jnp.float32)
    cos, sin = rope_tables(jnp.arange(T), D, BASE)
    return x.astype(dtype), cos, sin


def loss_and_grad(fn, x, seed=1):
    w = jax.random.normal(jax.random.key(seed), x.shape, jnp.float32)
    return jax.value_and_grad(lambda x: jnp.sum(fn(x).astype(jnp.float32) * w))(x)


def test_xla_matches_rope_then_norm_in_float64():
    x, cos, sin = inputs()
    got = np.asarray(rope_norm_xla(x, cos, sin, eps=EPS, scale=SCALE))
    want = numpy_rope_then_norm(x)
    assert np.abs(want - np.asarray(x)).max() > 0.5  # the op changes its input
    np.testing.assert_allclose(got, want, rtol=0, atol=3e-6)
    # position 0 is not rotated: there the op is a plain RMSNorm * scale
    x0 = np.asarray(x[:, 0], np.float64)
    np.testing.assert_allclose(got[:, 0], SCALE * x0 / np.sqrt(np.mean(x0**2, -1, keepdims=True) + EPS), atol=3e-6)


@pytest.mark.parametrize("shape", [(2, 48, 3, 32), (1, 64, 2, 128), (2, 32, 6, 16)])
def test_pallas_kernels_match_xla_forward_and_gradient(shape):
    B, T, N, D = shape
    x, cos, sin = inputs(B, T, N, D)
    ref = lambda x: rope_norm_xla(x, cos, sin, eps=EPS, scale=SCALE)
    ker = lambda x: rope_norm_pallas(x, cos, sin, eps=EPS, scale=SCALE, interpret=True)
    np.testing.assert_allclose(np.asarray(ker(x)), np.asarray(ref(x)), rtol=0, atol=2e-6)
    (l_ref, g_ref), (l_ker, g_ker) = loss_and_grad(ref, x), loss_and_grad(ker, x)
    assert float(jnp.abs(g_ref).max()) > 0.05
    np.testing.assert_allclose(float(l_ker), float(l_ref), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g_ker), np.asarray(g_ref), rtol=0, atol=2e-6)


def test_pallas_gradient_matches_finite_differences():
    """The hand-written backward against central differences of the forward (float64-free: small steps in fp32
    on a well-scaled input, checked along random directions)."""
    x, cos, sin = inputs(1, 16, 1, 16)
    w = jax.random.normal(jax.random.key(3), x.shape)
    f = lambda x: jnp.sum(rope_norm_pallas(x, cos, sin, eps=EPS, scale=SCALE, interpret=True) * w)
    g = jax.grad(f)(x)
    for seed in range(3):
        d = jax.random.normal(jax.random.key(10 + seed), x.shape)
        h = 1e-2
        fd = (f(x + h * d) - f(x - h * d)) / (2 * h)
        np.testing.assert_allclose(float(jnp.sum(g * d)), float(fd), rtol=2e-3)


def test_pallas_bfloat16_matches_xla_to_rounding():
    x, cos, sin = inputs(2, 32, 2, 64, dtype=jnp.bfloat16)
    ref = lambda x: rope_norm_xla(x, cos, sin, eps=EPS, scale=SCALE)
    ker = lambda x: rope_norm_pallas(x, cos, sin, eps=EPS, scale=SCALE, interpret=True)
    y_ref, y_ker = ref(x), ker(x)
    assert y_ker.dtype == jnp.bfloat16
    diff = np.abs(np.asarray(y_ker, np.float32) - np.asarray(y_ref, np.float32))
    assert diff.max() <= 2.0**-7 * np.abs(np.asarray(y_ref, np.float32)).max()  # one bf16 ulp of the largest
    (_, g_ref), (_, g_ker) = loss_and_grad(ref, x), loss_and_grad(ker, x)
    rel = float(jnp.linalg.norm((g_ker - g_ref).astype(jnp.float32)) / jnp.linalg.norm(g_ref.astype(jnp.float32)))
    assert rel < 1e-2


def test_impl_choice_and_errors():
    shape = (2, 64, 6, 128)
    assert resolve_impl("xla", shape, jnp.bfloat16) == "xla"
    if jax.devices()[0].platform == "cpu":
        assert resolve_impl("auto", shape, jnp.bfloat16) == "xla"
        with pytest.raises(ConfigError, match="no CUDA GPU.*model.rope_norm=auto or xla"):
            resolve_impl("pallas", shape, jnp.bfloat16)
    assert resolve_impl("auto", (2, 64, 6, 96), jnp.bfloat16) == "xla"  # 96 is no power of two
    with pytest.raises(ConfigError, match="sequence length 40 is not a multiple of 16"):
        rope_norm_pallas(*inputs(1, 40, 1, 32), eps=EPS, scale=SCALE, interpret=True)
    with pytest.raises(ConfigError, match="model.rope_norm='fast'"):
        rope_norm(*inputs(1, 16, 1, 16), eps=EPS, scale=SCALE, impl="fast")


def on_cuda():
    return jax.devices()[0].platform == "gpu"


@pytest.mark.gpu
@pytest.mark.skipif(not on_cuda(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_on_gpu_matches_xla(dtype):
    """The compiled kernels against the jnp op: outputs to one rounding of the dtype, gradients to 1e-5 (fp32) or
    1e-2 (bf16) relative norm. (Compare outputs, not a sum of them: a sum of 786K bf16 terms of both signs differs
    by ~1 between any two roundings.)"""
    x, cos, sin = inputs(4, 256, 6, 128, dtype=dtype)
    ref = jax.jit(lambda x: loss_and_grad(lambda x: rope_norm_xla(x, cos, sin, eps=EPS, scale=SCALE), x))
    ker = jax.jit(lambda x: loss_and_grad(lambda x: rope_norm(x, cos, sin, eps=EPS, scale=SCALE, impl="pallas"), x))
    y_ref = np.asarray(jax.jit(lambda x: rope_norm_xla(x, cos, sin, eps=EPS, scale=SCALE))(x), np.float32)
    y_ker = np.asarray(jax.jit(lambda x: rope_norm(x, cos, sin, eps=EPS, scale=SCALE, impl="pallas"))(x), np.float32)
    ulp = 2.0**-23 if dtype == jnp.float32 else 2.0**-7
    assert np.abs(y_ker - y_ref).max() <= 4 * ulp * np.abs(y_ref).max()
    (_, g_ref), (_, g_ker) = ref(x), ker(x)
    rel = float(jnp.linalg.norm((g_ker - g_ref).astype(jnp.float32)) / jnp.linalg.norm(g_ref.astype(jnp.float32)))
    assert float(jnp.abs(g_ref.astype(jnp.float32)).max()) > 0.01
    assert rel < (1e-5 if dtype == jnp.float32 else 1e-2)


MESH_CHILD = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxchat.compilation import enable_compilation_cache
from jaxchat.model.rotary import rope_norm_pallas, rope_norm_xla, rope_tables

enable_compilation_cache()
events = []
jax.monitoring.register_event_listener(lambda name, **_: events.append(name))

mesh = Mesh(np.array(jax.devices()), ("data",))
B, T, N, D = 16, 32, 2, 32
x = jax.device_put(3.0 * jax.random.normal(jax.random.key(0), (B, T, N, D)), NamedSharding(mesh, P("data")))
w = jax.device_put(jax.random.normal(jax.random.key(1), (B, T, N, D)), NamedSharding(mesh, P("data")))
cos, sin = rope_tables(jnp.arange(T), D, 100000.0)
def loss(fn):
    return jax.jit(jax.value_and_grad(lambda x: jnp.sum(fn(x) * w)))
ker = loss(lambda x: rope_norm_pallas(x, cos, sin, eps=1e-6, scale=1.2, interpret=True))
ref = loss(lambda x: rope_norm_xla(x, cos, sin, eps=1e-6, scale=1.2))
(lk, gk), (lr, gr) = ker(x), ref(x)
hlo = ker.lower(x).compile().as_text()
json.dump({"devices": jax.device_count(), "loss": [float(lk), float(lr)],
           "cache_hits": events.count("/jax/compilation_cache/cache_hits"),
           "grad_err": float(jnp.abs(gk - gr).max()), "grad_max": float(jnp.abs(gr).max()),
           "grad_spec": [str(a) for a in gk.sharding.spec], "all_gather": "all-gather" in hlo},
          open(sys.argv[1], "w"))
"""


def test_pallas_kernels_run_per_batch_shard_on_a_mesh(tmp_path):
    """On 8 devices with the batch split over `data`, each device runs the kernels on its own rows: the values
    equal the jnp op's, the gradient stays batch-sharded, and the compiled step gathers nothing. A second
    process finds the custom-partitioned programs in the persistent compilation cache (older JAX versions
    keyed them by a per-process pointer: jax-ml/jax#21159)."""
    out = tmp_path / "r.json"
    env = child_env(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAXCHAT_COMPILE_CACHE=tmp_path / "xla",
                    JAXCHAT_COMPILE_CACHE_MIN_SECONDS=0)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    runs = []
    for _ in range(2):
        subprocess.run([sys.executable, "-c", MESH_CHILD, str(out)], env=env, check=True, timeout=300)
        runs.append(json.loads(out.read_text()))
    assert runs[0]["cache_hits"] == 0 and runs[1]["cache_hits"] >= 2  # both jitted programs, loaded
    r = runs[1]
    assert r["devices"] == 8
    np.testing.assert_allclose(r["loss"][0], r["loss"][1], rtol=1e-5)
    assert r["grad_max"] > 0.05 and r["grad_err"] < 2e-6
    assert r["grad_spec"][0] == "data" and not r["all_gather"]


@pytest.mark.parametrize("norm_first", [False, True])
def test_a_zero_head_stays_zero_through_the_reference_path(norm_first):
    """RMSNorm's eps is added under the root: an all-zero head (e.g. a zero-init projection's output) gives zeros,
    not NaN, on the reference path that golf's order and partial RoPE take (rms(x) = x / sqrt(mean(x^2) + eps))."""
    cos, sin = rope_tables(jnp.arange(4), 8, 10000.0)
    x = jnp.zeros((1, 4, 2, 16), jnp.float32)  # head_dim 16, rotating only 8 dims: the partial-RoPE branch
    out = np.asarray(rope_norm_xla(x, cos, sin, eps=2.0**-23, scale=1.2, norm_first=norm_first))
    assert np.isfinite(out).all() and (out == 0).all()
