"""Execution options that must not change the math: `model.scan_layers` (lax.scan over layer groups) and
`model.remat` (activation checkpointing by named policy). Each is compared with the plain unrolled model on the
same parameters, in fp32, for the loss and every gradient; and each is shown to really change the compiled
program (a while loop; smaller saved activations), so the comparisons are not trivially between two copies."""

import os
import re
from dataclasses import replace


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src.ad_checkpoint import saved_residuals  # JAX's own account of what a backward keeps (private API)

from jaxchat.config import REMAT_POLICIES, Config, ConfigError, DataConfig, ModelConfig
from jaxchat.dtypes import resolve_compute_dtype
from jaxchat.resume import check_resume_config
from jaxchat.model.gpt import GPT, param_dict
from jaxchat.model.scan import describe, scan_layout
from jaxchat.plan import resolve
from jaxchat.presets import get_preset

# 9 layers of SSSL: two scanned groups of 4 (value embeddings on odd layers) + the forced-long last layer unrolled;
# the backout layer (9 // 2 = 4) sits inside the second group. 160 tokens > the short window of 128.
CFG = ModelConfig(vocab_size=320, sequence_len=512, n_layer=9, n_embd=64, n_head=4, n_kv_head=2)
T = 160


def random_params(cfg: ModelConfig, seed=0) -> dict:
    """Parameters moved off their init (zero-init projections and lambdas included), so every path matters."""
    params = param_dict(GPT(cfg, nnx.Rngs(seed)))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def loss_fn(cfg: ModelConfig):
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: GPT(cfg)))

    def loss(params, idx, targets):
        return jnp.mean(nnx.merge(graphdef, params)(idx, targets=targets))

    return loss


def batch(cfg, B=2, seed=3):
    idx = jax.random.randint(jax.random.PRNGKey(seed), (B, T + 1), 0, cfg.vocab_size)
    return idx[:, :-1], idx[:, 1:]


def loss_and_grads(cfg, params, idx, tgt):
    return jax.jit(jax.value_and_grad(loss_fn(cfg)))(params, idx, tgt)


def assert_same(a, b, atol):
    (la, ga), (lb, gb) = a, b
    assert float(la) > 0.1 and abs(float(la) - float(lb)) <= atol
    flat_a, flat_b = jax.tree.leaves_with_path(ga), jax.tree.leaves(gb)
    assert len(flat_a) == len(flat_b)
    for (path, x), y in zip(flat_a, flat_b):
        assert float(jnp.max(jnp.abs(x))) > 0, f"gradient {jax.tree_util.keystr(path)} is all zero"
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=atol,
                                   err_msg=jax.tree_util.keystr(path))


def test_scan_layout_of_presets():
    """Which layers scan, for the presets users run and for the awkward cases."""
    assert scan_layout(get_preset("nanochat-d12").model) == (4, 3)
    assert scan_layout(get_preset("nanochat-d20").model) == (4, 5)
    assert scan_layout(get_preset("d12-gelu-chinchilla").model)[1] >= 2
    assert scan_layout(CFG) == (4, 2)  # layer 8 would be short by the pattern but is forced long
    assert scan_layout(replace(CFG, n_layer=4)) == (4, 0)  # one group: nothing to scan
    assert scan_layout(replace(CFG, window_pattern="L", value_embeds=False)) == (1, 9)
    assert scan_layout(replace(CFG, window_pattern="SSL")) == (6, 0)  # SSL x alternating value embeds: period 6
    assert describe(replace(CFG, scan_layers=True)) == "scan over 2 groups of 4 layers + 1 unrolled"
    assert describe(CFG) == "9 layers unrolled"


@pytest.fixture(scope="module")
def reference():
    params = random_params(CFG)
    idx, tgt = batch(CFG)
    return params, idx, tgt, loss_and_grads(CFG, params, idx, tgt)


def test_scan_equals_unrolled(reference):
    params, idx, tgt, ref = reference
    cfg = replace(CFG, scan_layers=True)
    assert_same(loss_and_grads(cfg, params, idx, tgt), ref, atol=2e-6)
    hlo = lambda c: jax.jit(jax.grad(loss_fn(replace(c, loss_chunk=0)))).lower(params, idx, tgt).as_text()
    assert "while" in hlo(cfg) and "while" not in hlo(CFG)  # the head unchunked: its chunks are a loop too


@pytest.mark.parametrize("policy", [
    "full", pytest.param("dots", marks=pytest.mark.slow), pytest.param("dots_no_batch", marks=pytest.mark.slow),
    pytest.param("save_qkv_proj", marks=pytest.mark.slow), "save_out_proj"])
def test_remat_policies_equal_no_remat(reference, policy):
    params, idx, tgt, ref = reference
    assert_same(loss_and_grads(replace(CFG, remat=policy, scan_layers=True), params, idx, tgt), ref, atol=2e-6)


def test_remat_policies_save_what_they_say():
    """The activations each policy keeps for the backward pass (JAX's own account of the residuals, the same on
    every backend; XLA:CPU's buffer statistics do not show remat, its scheduler recomputes early)."""
    cfg = replace(CFG, n_layer=4)
    params = random_params(cfg)
    idx, tgt = batch(cfg)

    def saved(policy):
        res = saved_residuals(loss_fn(replace(cfg, remat=policy)), params, idx, tgt)
        res = [(a, d) for a, d in res if not d.startswith("from the argument")]  # parameters cost no extra memory
        return sum(a.size * a.dtype.itemsize for a, _ in res), " ".join(d for _, d in res)

    size = {p: saved(p)[0] for p in REMAT_POLICIES}
    assert size["full"] < 0.15 * size["none"]
    assert size["full"] < size["save_out_proj"] < size["save_qkv_proj"] < size["dots_no_batch"] < size["dots"]
    assert size["dots"] < size["none"]
    assert "named 'q_proj'" in saved("save_qkv_proj")[1] and "named 'q_proj'" not in saved("full")[1]


@pytest.mark.parametrize("overrides", [
    dict(mlp="gelu", tie_embeddings=True, n_kv_head=4),  # the GELU seed card's shape: tied, no GQA
    pytest.param(dict(mlp="yatnmn_softplus", value_embeds=False, smear=False, backout=False, residual_lambdas=False),
                 marks=pytest.mark.slow),
    dict(mlp="swiglu", window_pattern="L", n_layer=6),  # every layer scanned (period 2: value embeddings)
    # the golf switches the scan handles (U-Net and LN scale refuse it): per-dim resid_mix sliced by the traced
    # layer, attn/mlp scales and q_gain stacked with the blocks, BigramHash and SmearGate v1 before the scan
    dict(rope_dims=8, qk_norm_before_rope=True, q_gain=1.5, attn_scale_mult=1.35, smear_v1=True, bigram_buckets=37,
         bigram_dim=16, golf_block=True, mlp_mult=3, mlp="leaky_relu2"),
])
def test_scan_other_architectures(overrides):
    cfg = replace(CFG, **overrides)
    assert scan_layout(cfg)[1] >= 2
    params = random_params(cfg)
    idx, tgt = batch(cfg)
    assert_same(loss_and_grads(replace(cfg, scan_layers=True, remat="dots_no_batch"), params, idx, tgt),
                loss_and_grads(cfg, params, idx, tgt), atol=2e-6)


@pytest.mark.slow
def test_scan_bf16_matches_unrolled_bf16(reference):
    params, idx, tgt, _ = reference
    cfg = replace(CFG, compute_dtype="bfloat16")
    (la, _), (lb, _) = (loss_and_grads(c, params, idx, tgt) for c in (cfg, replace(cfg, scan_layers=True)))
    assert float(la) > 0.1 and abs(float(la) - float(lb)) < 1e-2


def test_parameters_do_not_depend_on_execution_options():
    """Checkpoints are interchangeable: same parameter tree for every scan/remat/loss-chunk setting."""
    shapes = lambda c: jax.tree.map(lambda x: (x.shape, x.dtype), nnx.state(nnx.eval_shape(lambda: GPT(c))))
    assert shapes(CFG) == shapes(replace(CFG, scan_layers=True, remat="full", loss_chunk=64))


def test_resume_may_change_execution_options_only():
    config = lambda **kw: Config(model=replace(CFG, **kw), data=DataConfig(tokenizer_vocab=CFG.vocab_size))
    check_resume_config(config(scan_layers=True, remat="dots", loss_chunk=128, attention="auto"), config())
    with pytest.raises(ConfigError, match="model.n_layer"):
        check_resume_config(config(n_layer=8), config())


def cpuinfo_has_bf16() -> bool:
    """The CPU's bf16 flags, read here independently of dtypes.cpu_has_bf16_units."""
    if not os.path.exists("/proc/cpuinfo"):
        return False
    return re.search(r"\b(amx_bf16|avx512_bf16)\b", open("/proc/cpuinfo").read()) is not None


def test_compute_dtype_auto_is_resolved_per_device_and_checked_on_resume():
    """`auto` is bfloat16 on a GPU/TPU or a CPU with bf16 units, float32 on other CPUs; plan.resolve makes it
    concrete, so a run directory records the dtype, and a resume that would change it is refused while `auto`
    meaning the saved one is not."""
    config = lambda **kw: Config(model=replace(CFG, **kw), data=DataConfig(tokenizer_vocab=CFG.vocab_size))
    here = "float32" if jax.default_backend() == "cpu" else "bfloat16"  # conftest: JAXCHAT_CPU_BF16=0
    other = "bfloat16" if here == "float32" else "float32"
    assert resolve_compute_dtype("auto") == here and resolve_compute_dtype(other) == other
    assert resolve(config(compute_dtype="auto")).model.compute_dtype == here
    check_resume_config(config(compute_dtype="auto"), config(compute_dtype=here))
    with pytest.raises(ConfigError, match=f"model.compute_dtype: checkpoint has '{other}', now 'auto'"):
        check_resume_config(config(compute_dtype="auto"), config(compute_dtype=other))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="auto's CPU rule")
def test_compute_dtype_auto_on_a_cpu_follows_its_bf16_units(monkeypatch):
    monkeypatch.delenv("JAXCHAT_CPU_BF16")
    assert resolve_compute_dtype("auto") == ("bfloat16" if cpuinfo_has_bf16() else "float32")
    for forced, dtype in (("1", "bfloat16"), ("0", "float32")):
        monkeypatch.setenv("JAXCHAT_CPU_BF16", forced)
        assert resolve_compute_dtype("auto") == dtype
    monkeypatch.setenv("JAXCHAT_CPU_BF16", "yes")
    with pytest.raises(ConfigError, match="JAXCHAT_CPU_BF16='yes': set 1"):
        resolve_compute_dtype("auto")


def test_bad_remat_name_is_refused():
    with pytest.raises(ConfigError, match="model.remat='dot'.*dots_no_batch"):
        replace(CFG, remat="dot")


def test_remat_prevents_cse_outside_a_scan_only():
    """Unscanned, jax.checkpoint must keep XLA from merging the recomputation into the forward (prevent_cse);
    inside lax.scan the loop already does, and prevent_cse would only cost speed (model/remat.py)."""
    from jaxchat.model.remat import remat

    def params_of(fn):
        eqns = [e for e in jax.make_jaxpr(fn)(jnp.ones(3)).jaxpr.eqns
                if e.primitive.name in ("checkpoint", "remat", "remat2")]
        assert len(eqns) == 1
        return eqns[0].params

    f = lambda x: jnp.sin(x) * 2  # noqa: E731
    assert params_of(remat(f, "full"))["prevent_cse"] is True
    assert params_of(remat(f, "full", in_scan=True))["prevent_cse"] is False
    assert remat(f, "none") is f


def test_group_layer_is_layer_by_hand():
    """GroupLayer.is_layer(k) (where the scan takes backout's residual) is True in exactly the one group holding
    layer k at this position, and the Python False where no group does (other position, or past the groups)."""
    import jax.numpy as jnp
    from jaxchat.model.scan import GroupLayer

    period, n_groups = 3, 4  # layers 0..11; position 1 holds layers 1, 4, 7, 10
    for g in range(n_groups):
        at = GroupLayer(jnp.int32(g), position=1, period=period, n_groups=n_groups, ve=None)
        for k in range(15):
            want = k % period == 1 and k // period == g and k < period * n_groups
            got = at.is_layer(k)
            if k % period != 1 or k >= period * n_groups:
                assert got is False, (g, k)  # known at trace time
            else:
                assert bool(got) == want, (g, k)
