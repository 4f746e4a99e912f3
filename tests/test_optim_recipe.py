"""nanochat's recipe: parameter groups, schedules, depth-scaling plan, and the whole optimizer on a tiny GPT."""

import math
import tempfile
from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from jaxchat.config import Config, ConfigError, ModelConfig
from jaxchat.model.accounting import param_shapes
from jaxchat.model.gpt import GPT, cross_entropy, param_path
from jaxchat.optim import groups as G
from jaxchat.optim import schedules as S
from jaxchat.optim.groups import ParamGroupError, assign_groups, describe_groups, group_hparams, nanochat_optimizer
from jaxchat.optim.scaling import nanochat_config, nanochat_shape, reference_config, scaling_params
from jaxchat.plan import make_plan
from jaxchat.presets import get_preset


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=128, sequence_len=16, n_layer=3, n_embd=32, n_head=2, n_kv_head=1, smear_channels=8,
                ve_gate_channels=4)
    return ModelConfig(**{**base, **kw})


def expected_groups(cfg: ModelConfig) -> dict:
    """Every parameter path of the model and its group, enumerated from docs/architecture.md §Optimizer by hand."""
    e = {("wte", "embedding"): "wte", ("resid_lambdas",): "resid_lambdas", ("x0_lambdas",): "x0_lambdas",
         ("smear_gate", "kernel"): "scalars", ("smear_lambda",): "scalars", ("backout_lambda",): "scalars"}
    if not cfg.tie_embeddings:
        e[("lm_head", "kernel")] = "lm_head"
    for i in range(cfg.n_layer):
        b = ("blocks", str(i))
        for name in ("c_q", "c_k", "c_v", "c_proj"):
            e[b + ("attn", name, "kernel")] = "muon"
        if i % 2 == (cfg.n_layer - 1) % 2:
            e[b + ("attn", "ve_gate", "kernel")] = "muon"
            e[("value_embeds", str(i), "embedding")] = "value_embeds"
        mlp = ["c_fc", "c_proj"] + (["c_gate"] if cfg.mlp == "swiglu" else [])
        for name in mlp:
            e[b + ("mlp", name, "kernel")] = "muon"
        if cfg.mlp.startswith("yatnmn"):
            e[b + ("mlp", "c_fc", "bias")] = "scalars"
            e[b + ("mlp", "c_fc", "alpha")] = "scalars"
        if cfg.mlp == "yatnmn_softplus":
            e[b + ("mlp", "c_fc", "epsilon_param")] = "scalars"
    return e


@pytest.mark.parametrize("variant", [{}, {"mlp": "swiglu"}, {"mlp": "yatnmn"}, {"mlp": "yatnmn_softplus"},
                                     {"tie_embeddings": True}, {"mlp": "gelu", "n_layer": 4}])
def test_every_parameter_lands_in_its_group(variant):
    cfg = tiny(**variant)
    state = param_shapes(cfg)
    got = {param_path(kp): lab for kp, lab in jax.tree_util.tree_leaves_with_path(assign_groups(state))}
    flat = {tuple(str(k) for k in path) for path, _ in nnx.to_flat_state(state)}
    expected = expected_groups(cfg)
    assert set(got) == flat == set(expected)
    assert got == expected
    # a plain dict of arrays gets the same labels
    pure = nnx.to_pure_dict(state)
    assert sorted(jax.tree.leaves(assign_groups(pure))) == sorted(expected.values())


def test_unknown_parameter_names_its_path():
    with pytest.raises(ParamGroupError, match="blocks/0/attn/rope_scale"):
        assign_groups({"blocks": {0: {"attn": {"rope_scale": jnp.zeros((4,))}}}})
    with pytest.raises(ParamGroupError, match="mystery/kernel"):
        assign_groups({"mystery": {"kernel": jnp.zeros((2, 2))}})
    with pytest.raises(ParamGroupError, match="mystery"):
        nanochat_optimizer({"mystery": jnp.zeros((2,))}, tiny(), 10, 2**19)
    with pytest.raises(ValueError, match="unknown"):
        group_hparams(tiny(), 2**19, {"embeddings": {"lr": 1.0}})


def test_tied_wte_hyperparameters():
    cfg = tiny(tie_embeddings=True)
    w = (32 / 768) ** -0.5
    assert group_hparams(cfg, 2**19)["wte"]["lr"] == pytest.approx(0.3 * w)
    alt = group_hparams(cfg, 2**19, {"tied_wte_group": "lm_head"})["wte"]
    assert alt["lr"] == pytest.approx(0.008 * w) and alt["betas"] == (0.8, 0.96) and alt["wd"] == 0.01


def nanochat_lr(it, n, warmup=40, ratio=0.65, final=0.05):
    """nanochat base_train.get_lr_multiplier, transcribed."""
    wd_iters = round(ratio * n)
    if it < warmup:
        return (it + 1) / warmup
    if it <= n - wd_iters:
        return 1.0
    p = (n - it) / wd_iters
    return p * 1.0 + (1 - p) * final


def test_schedules_at_chosen_steps():
    n = 2000  # warmdown 1300 steps, from step 700
    lr = lambda s: float(S.lr_multiplier(s, n))  # noqa: E731
    assert lr(0) == pytest.approx(1 / 40) and lr(39) == pytest.approx(1.0) and lr(40) == 1.0
    assert lr(400) == 1.0 and lr(700) == 1.0
    assert lr(701) == pytest.approx(1299 / 1300 + (1 / 1300) * 0.05)
    assert lr(1350) == pytest.approx(0.5 + 0.5 * 0.05)
    assert lr(n - 1) == pytest.approx(1 / 1300 + (1299 / 1300) * 0.05) and lr(n) == pytest.approx(0.05)
    for s in (0, 17, 39, 40, 699, 700, 701, 1234, 1999):
        assert lr(s) == pytest.approx(nanochat_lr(s, n), rel=1e-6)
    mom = lambda s: float(S.muon_momentum(s, n))  # noqa: E731
    assert mom(0) == pytest.approx(0.85) and mom(200) == pytest.approx(0.91) and mom(400) == pytest.approx(0.97)
    assert mom(700) == pytest.approx(0.97) and mom(1350) == pytest.approx(0.935) and mom(n) == pytest.approx(0.90)
    assert float(S.muon_momentum(399, 500)) == pytest.approx(0.85 + 0.12 * 399 / 400)  # ramp wins over warmdown
    wd = lambda s: float(S.muon_weight_decay(s, n, 0.28))  # noqa: E731
    assert wd(0) == pytest.approx(0.28) and wd(n // 2) == pytest.approx(0.14) and wd(n) == pytest.approx(0, abs=1e-8)
    assert wd(n // 4) == pytest.approx(0.14 * (1 + math.cos(math.pi / 4)))
    traced = jax.jit(lambda s: (S.lr_multiplier(s, n), S.muon_momentum(s, n)))(jnp.int32(1350))
    assert float(traced[0]) == pytest.approx(lr(1350)) and float(traced[1]) == pytest.approx(mom(1350))


def test_depth_shapes_and_scaling_params():
    assert nanochat_shape(12) == dict(n_embd=768, n_head=6, n_kv_head=6)
    assert nanochat_shape(20)["n_embd"] == 1280 and nanochat_shape(26)["n_embd"] == 1664
    assert nanochat_shape(3) == dict(n_embd=256, n_head=2, n_kv_head=2)  # 192 rounded up to 256
    # docs/architecture.md §Counts, the d12 split: attention + MLP + ve gates + lm_head
    assert scaling_params(nanochat_config(12)) == 28_311_552 + 56_623_104 + 432 + 25_165_824
    assert reference_config(tiny()).n_embd == 768


def nanochat_run(depth: int, **train) -> Config:
    """nanochat's recipe (the nanochat-* presets: Muon, batch and horizon from the scaling rules, seq 2048) at
    `depth`, with `train` fields overridden."""
    cfg = get_preset("nanochat-d12")
    return replace(cfg, model=nanochat_config(depth, cfg.model), train=replace(cfg.train, **train))


@pytest.mark.parametrize("depth,ratio,batch,steps,accum", [(12, 12, 524_288, 2_520, 1), (20, 12, 1_048_576, 4_980, 2),
                                                          (24, 8, 1_048_576, 5_568, 2)])
def test_plan_reproduces_nanochat(depth, ratio, batch, steps, accum):
    plan = make_plan(nanochat_run(depth, target_param_data_ratio=ratio, device_batch_size=32), devices=8)
    assert (plan["batch_tokens"], plan["num_steps"], plan["grad_accum"]) == (batch, steps, accum)
    assert plan["tokens"] == batch * steps
    g = {row["group"]: row for row in plan["groups"]}
    if depth == 12:
        assert round(plan["tokens"] / 1e9, 2) == 1.32 and g["muon"]["lr"] == 0.02  # lr scale sqrt(B / 2^19) = 1
    if depth == 24:
        assert round(plan["tokens"] / 1e9, 2) == 5.84 and f"{plan['total_flops']:.2e}" == "2.79e+19"
        assert g["muon"]["lr"] == pytest.approx(0.02 * math.sqrt(2))
        assert g["muon"]["wd"] == pytest.approx(0.28 * math.sqrt(2) * 110_100_912 / 729_810_624)
        assert g["lm_head"]["lr"] == pytest.approx(0.008 * (1536 / 768) ** -0.5 * math.sqrt(2))
        assert g["x0_lambdas"]["lr"] == pytest.approx(0.5 * math.sqrt(2)) and g["lm_head"]["wd"] == 0.01


def test_plan_horizon_precedence_and_errors():
    """num_steps > 0 wins over target_flops, which wins over the ratio; the batch still follows the ratio rule."""
    p = make_plan(nanochat_run(12, num_steps=100, target_flops=1e18, device_batch_size=16))
    assert p["num_steps"] == 100 and p["grad_accum"] == 16 and p["batch_tokens"] == 524_288
    f = make_plan(nanochat_run(12, target_flops=1e18, device_batch_size=16))
    assert f["num_steps"] == round(1e18 / (f["flops_per_token"] * 524_288)) != p["num_steps"]
    with pytest.raises(ConfigError, match="not a multiple"):
        make_plan(nanochat_run(12, device_batch_size=3))


TRAIN_STEPS, TRAIN_BATCH = 30, 2**20

# karpathy/nanochat@92d63d4 nanochat/optim.py `polar_express_coeffs`, written out so the reference is independent
NANOCHAT_POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def polar_express_poly(s):
    """What the 5 Polar Express steps do to each normalised singular value."""
    for a, b, c in NANOCHAT_POLAR_EXPRESS_COEFFS:
        s = a * s + b * s**3 + c * s**5
    return s


@pytest.fixture(scope="module")
def trained():
    """20 jitted steps of the full recipe (bf16 Polar Express) on a tiny GPT (head_dim 128 as nanochat; at
    C=32 the (C/768)^-0.5 width rule lifts the embedding lr to 1.5 and the loss spikes within 20 steps).
    Keeps the first step's params, grads and updates."""
    cfg = tiny(n_layer=2, n_embd=128, n_head=1, n_kv_head=1)
    graphdef, params, rest = nnx.split(GPT(cfg), nnx.Param, ...)
    tx = nanochat_optimizer(params, cfg, num_steps=TRAIN_STEPS, batch_tokens=TRAIN_BATCH)
    state = tx.init(params)
    idx = jax.random.randint(jax.random.key(1), (16, 17), 0, 128)

    def loss_fn(p):
        return cross_entropy(nnx.merge(graphdef, p, rest)(idx[:, :-1]), idx[:, 1:])

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss, g, u

    losses, first = [], None
    for _ in range(20):
        p0 = params
        params, state, loss, g, u = step(params, state)
        first = first or dict(params=p0, grads=g, updates=u)
        losses.append(float(loss))
    return dict(cfg=cfg, losses=losses, state=state, first=first)


def test_jitted_recipe_reduces_the_loss(trained):
    losses = trained["losses"]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 1.0


def test_optimizer_state_is_checkpointable(trained):
    state = trained["state"]
    leaves = jax.tree.leaves(state)
    assert leaves and all(isinstance(x, jax.Array) for x in leaves)
    with tempfile.TemporaryDirectory() as d, ocp.StandardCheckpointer() as ck:
        ck.save(f"{d}/opt", state)
        ck.wait_until_finished()
        back = ck.restore(f"{d}/opt", state)
    assert jax.tree.structure(back) == jax.tree.structure(state)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), leaves))


def test_first_update_of_every_group_uses_its_hyperparameters(trained):
    """From zero state AdamW's first step is exactly -lr (g / (|g| + eps) + wd p) with lr = peak / 40
    (lr_multiplier(0)). Muon's is u = -lr_eff (X + wd P [X P >= 0]); the two cases are told apart by the sign
    of u P, so X can be recovered. NorMuon keeps ||X||_F, the norm of the Polar Express output, whose
    singular values are p(s_i) for the gradient's normalised singular values s_i (p: the 5-step polynomial):
    >= 0.8589 for s_i >= 1e-3, p(s_i) (increasing) below, never above 1.1411; bf16 rounding can only add
    energy, filling the null space of a rank-deficient gradient with values <= 1.1411. So
    sqrt(sum_i min(p(s_i), 0.8589)^2) <= ||X||_F <= 1.1411 sqrt(min(in, out)), with 4 x 2^-8 slack
    (test_muon.py). The range is narrower than 2x, so a factor-2 error in lr (e.g. a lost sqrt(out/in))
    leaves it; zero-gradient kernels (q/k/v behind the zero-init c_proj) get pure decay: lr x wd, exactly."""
    cfg, f = trained["cfg"], trained["first"]
    s, w = math.sqrt(TRAIN_BATCH / 2**19), (cfg.n_embd / 768) ** -0.5
    adam = {"lm_head": (0.008 * w, 0.01), "wte": (0.3 * w, 0.001), "value_embeds": (0.15 * w, 0.01),
            "resid_lambdas": (0.005, 0.05), "x0_lambdas": (0.5, 0.0), "scalars": (0.2, 0.0)}
    muon_wd = 0.28 * s * scaling_params(reference_config(cfg)) / scaling_params(cfg)  # cosine(0) = 1
    labels = jax.tree.leaves(assign_groups(f["params"]))
    as_np = lambda t: [np.asarray(x, np.float64) for x in jax.tree.leaves(t)]  # noqa: E731
    seen = set()
    for lab, g, p, u in zip(labels, *(as_np(f[k]) for k in ("grads", "params", "updates"))):
        if np.abs(u).max() > 0:  # (smear_gate's gradient is 0 while smear_lambda is 0)
            seen.add(lab)
        if lab == "muon":
            lr_eff = 0.02 * s / 40 * math.sqrt(max(1.0, p.shape[-1] / p.shape[-2]))  # sqrt(max(1, out / in))
            if np.abs(g).max() == 0:  # q/k/v behind the zero-init c_proj: X = 0, pure decay
                np.testing.assert_allclose(u, -lr_eff * muon_wd * p, rtol=1e-5, atol=1e-12)
                seen.add("muon: decay only")
                continue
            X = np.where(u * p > 0, -u / lr_eff, -u / lr_eff - muon_wd * p)
            sv = np.linalg.svd(g, compute_uv=False) / (1.01 * np.linalg.norm(g))
            lo = np.sqrt(np.sum(np.minimum(polar_express_poly(sv), 0.8589) ** 2)) * (1 - 4 * 2**-8)
            hi = 1.1411 * np.sqrt(min(p.shape)) * (1 + 4 * 2**-8)
            assert lo <= np.linalg.norm(X) <= hi and 2 * lo > hi, (p.shape, lo, np.linalg.norm(X), hi)
        else:
            lr, wd = adam[lab]
            want = -(lr * s / 40) * (g / (np.abs(g) + 1e-10) + wd * p)
            np.testing.assert_allclose(u, want, rtol=2e-5, atol=1e-9, err_msg=lab)
    assert seen == set(adam) | {"muon", "muon: decay only"}


def test_muon_receives_the_nanochat_schedules(monkeypatch):
    """nanochat_optimizer hands Muon lr 0.02 x sqrt(B/2^19) x lr_multiplier, the momentum schedule and
    0.28 x sqrt(B/2^19) x D_d12/D x cosine (muon() itself is checked against numpy in test_muon.py)."""
    seen = {}
    monkeypatch.setattr(G, "muon", lambda **kw: seen.update(kw) or optax.identity())
    cfg, n, B = tiny(mlp="yatnmn"), 1000, 2**21
    G.nanochat_optimizer(param_shapes(cfg), cfg, n, B)
    wd0 = 0.28 * 2 * scaling_params(reference_config(cfg)) / scaling_params(cfg)
    for c in (0, 39, 300, 500, 999):
        assert float(seen["learning_rate"](c)) == pytest.approx(0.02 * 2 * float(S.lr_multiplier(c, n)), rel=1e-6)
        assert float(seen["momentum"](c)) == pytest.approx(float(S.muon_momentum(c, n)), rel=1e-6)
        assert float(seen["weight_decay"](c)) == pytest.approx(float(S.muon_weight_decay(c, n, wd0)), rel=1e-6)
    assert float(seen["momentum"](0)) == pytest.approx(0.85) and float(seen["weight_decay"](0)) > 0.1
    assert seen["beta2"] == 0.9 and seen["ns_steps"] == 5 and seen["ns_dtype"] == jnp.bfloat16
    rows = {r["group"]: r for r in describe_groups(param_shapes(cfg), cfg, n, B)}
    assert rows["scalars"]["tensors"] == 3 + 2 * cfg.n_layer  # smear gate/lambda, backout + yatnmn bias, alpha
    assert rows["muon"]["wd"] == pytest.approx(wd0)


def test_adamw_betas_and_weight_decay_are_nanochats():
    """betas, eps and weight decay per AdamW group, written out from karpathy/nanochat@92d63d4 gpt.py
    `setup_optimizer` (the first update, checked above, cannot see beta2: Adam's bias correction cancels it)."""
    nanochat = {"lm_head": ((0.8, 0.96), 0.01), "wte": ((0.8, 0.995), 0.001), "value_embeds": ((0.8, 0.995), 0.01),
                "resid_lambdas": ((0.8, 0.95), 0.05), "x0_lambdas": ((0.96, 0.95), 0.0),
                "scalars": ((0.8, 0.95), 0.0)}
    assert {g: (tuple(h["betas"]), h["wd"]) for g, h in G.ADAMW_BASE.items()} == nanochat
    assert G.ADAMW_EPS == 1e-10
