"""Parameter golf's optimizer (optim/golf.py): the Newton-Schulz quintic and one Muon step against float64 numpy
references written here (coefficients copied from golf's train_gpt.py), the warmdown by step and by wall clock,
the momentum warmup, the parameter groups, and the golf presets building it."""

from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchat.config import ConfigError, ModelConfig, OptimConfig
from jaxchat.model.accounting import param_shapes
from jaxchat.model.gpt import param_path
from jaxchat.optim import build_optimizer, golf
from jaxchat.plan import resolve
from jaxchat.presets import get_preset

A, B, C = 3.4445, -4.7750, 2.0315  # golf's zeropower_via_newtonschulz5


def ns5_f64(g_torch_layout, steps=5):
    """golf's zeropower_via_newtonschulz5 on a PyTorch weight (out, in), in float64."""
    x = g_torch_layout / (np.linalg.norm(g_torch_layout) + 1e-7)
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    for _ in range(steps):
        a = x @ x.T
        b = B * a + C * a @ a
        x = A * x + b @ x
    return x.T if transposed else x


@pytest.mark.parametrize("shape", [(16, 48), (48, 16), (32, 32)])  # (in, out) kernels: wide, tall, square
def test_newton_schulz5_matches_golfs_in_float64(shape):
    g = np.random.default_rng(0).standard_normal(shape)
    got = np.asarray(golf.newton_schulz5(jnp.asarray(g, jnp.float32), 5, jnp.float32))
    ref = ns5_f64(g.T).T  # our kernel is the PyTorch weight transposed
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-4)
    s = np.linalg.svd(got, compute_uv=False)  # the quintic pushes singular values into ~[0.7, 1.2]
    assert 0.5 < s.min() and s.max() < 1.3 and np.abs(got - g).max() > 0.1


def test_newton_schulz5_in_bf16_stays_close():
    g = np.random.default_rng(1).standard_normal((64, 96))
    got = np.asarray(golf.newton_schulz5(jnp.asarray(g, jnp.float32)))
    assert np.abs(got - ns5_f64(g.T).T).max() < 0.05


def test_golf_muon_two_steps_match_numpy():
    """buf = mu buf + g; u = g + mu buf; p = (p - lr sqrt(max(1, out/in)) ns5(u)) (1 - wd lr), twice."""
    rng = np.random.default_rng(2)
    p0 = rng.standard_normal((16, 48))
    gs = [rng.standard_normal((16, 48)) for _ in range(2)]
    lr, mu, wd = 0.04, 0.9, 0.04
    opt = golf.golf_muon(lr, mu, wd, 5, jnp.float32)
    params = {"w": jnp.asarray(p0, jnp.float32)}
    state = opt.init(params)
    p, buf = p0.copy(), np.zeros_like(p0)
    for g in gs:
        upd, state = opt.update({"w": jnp.asarray(g, jnp.float32)}, state, params)
        params = {"w": params["w"] + upd["w"]}
        buf = mu * buf + g
        x = ns5_f64((g + mu * buf).T).T * np.sqrt(max(1.0, 48 / 16))
        p = (p - lr * x) * (1 - wd * lr)
    np.testing.assert_allclose(np.asarray(params["w"]), p, atol=2e-5, rtol=1e-4)
    assert np.abs(p - p0).max() > 0.02


def test_polar_express_is_selectable():
    g = jnp.asarray(np.random.default_rng(3).standard_normal((16, 48)), jnp.float32)
    params = {"w": jnp.zeros((16, 48))}
    outs = []
    for ortho in ("ns5", "polar_express"):
        opt = golf.golf_muon(0.1, 0.0, 0.0, 5, jnp.float32, orthogonalizer=ortho)
        outs.append(np.asarray(opt.update({"w": g}, opt.init(params), params)[0]["w"]))
    assert np.abs(outs[0] - outs[1]).max() > 1e-3
    with pytest.raises(ValueError, match="orthogonalizer='newton'"):
        golf.golf_muon(0.1, orthogonalizer="newton")


def test_warmdown_by_step():
    """N = 100, warmdown 30: 1 up to step 69, then (100 - step) / 30."""
    got = [float(golf.lr_scale(s, 100, 30)) for s in (0, 69, 70, 71, 85, 99)]
    np.testing.assert_allclose(got, [1.0, 1.0, 1.0, 29 / 30, 15 / 30, 1 / 30], rtol=1e-6)
    assert float(golf.lr_scale(50, 100, 0)) == 1.0


def test_warmdown_by_wall_clock():
    """Cap 600 s, warmdown 3000 steps: at 0.1 s a step the warmdown takes the last 300 s."""
    assert golf.lr_scale_wallclock(100.0, 1000, 600.0, 3000) == 1.0
    assert golf.lr_scale_wallclock(300.0, 3000, 600.0, 3000) == pytest.approx(1.0)
    assert golf.lr_scale_wallclock(450.0, 4500, 600.0, 3000) == pytest.approx(0.5)
    assert golf.lr_scale_wallclock(600.0, 6000, 600.0, 3000) == 0.0
    assert golf.lr_scale_wallclock(540.0, 2700, 600.0, 3000) == pytest.approx(60 / 600)  # slower steps: 0.2 s


def test_momentum_warmup():
    got = [float(golf.momentum_at(s, 0.85, 0.95, 500)) for s in (0, 250, 499, 500, 2000)]
    np.testing.assert_allclose(got, [0.85, 0.90, 0.85 + 0.1 * 499 / 500, 0.95, 0.95], rtol=1e-6)


def test_groups_of_the_pr334_model():
    cfg = replace(get_preset("golf-pr334").model, n_layer=3, vocab_size=256)
    groups = {param_path(kp): golf.group_of(param_path(kp), x.shape)
              for kp, x in jax.tree_util.tree_leaves_with_path(param_shapes(cfg))}
    assert groups[("wte", "embedding")] == "embed" and groups[("bigram", "embed")] == "embed"
    assert groups[("bigram", "proj", "kernel")] == "muon" and groups[("bigram", "scale")] == "scalars"
    assert groups[("blocks", "0", "attn", "c_q", "kernel")] == "muon"
    assert groups[("blocks", "0", "attn", "q_gain")] == "scalars" and groups[("skip_weights",)] == "scalars"
    assert "head" not in groups.values()  # tied


def test_pr334_recipe_builds_and_steps():
    cfg = get_preset("golf-pr334")
    cfg = replace(cfg, model=replace(cfg.model, n_layer=2, n_embd=64, n_head=2, n_kv_head=1, vocab_size=320,
                                     sequence_len=32, bigram_buckets=64, bigram_dim=16),
                  data=replace(cfg.data, tokenizer_vocab=320),
                  train=replace(cfg.train, num_steps=10, batch_size=2, device_batch_size=0))
    r = resolve(cfg)
    assert golf.hparams(r.model, {"muon": {"wd": 0.04}, "warmdown_iters": 3000})["muon"]["lr"] == 0.04
    params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), param_shapes(r.model))
    opt = build_optimizer(r, params)
    grads = jax.tree.map(lambda p: 0.01 * jnp.ones_like(p), params)
    upd, _ = opt.update(grads, opt.init(params), params)
    assert all(np.isfinite(np.asarray(u)).all() for u in jax.tree.leaves(upd))
    assert max(float(jnp.abs(u).max()) for u in jax.tree.leaves(upd)) > 0


def test_bad_overrides_are_named():
    with pytest.raises(ValueError, match="lr_head"):
        golf.hparams(ModelConfig(), {"lr_head": 1})
    with pytest.raises(ValueError, match="nesterov"):
        golf.hparams(ModelConfig(), {"muon": {"nesterov": True}})
    with pytest.raises(ConfigError, match="optim.optimizer='lion'"):
        OptimConfig(optimizer="lion")
    from jaxchat.config import TrainConfig
    with pytest.raises(ConfigError, match="train.max_seconds=-5"):
        TrainConfig(max_seconds=-5)
    with pytest.raises(ConfigError, match="train.tokens_per_param=0"):
        TrainConfig(tokens_per_param=0)


@pytest.mark.slow  # two short trainings (~100 s on 2 cores)
def test_max_seconds_stops_checkpointed_and_resumes(tmp_path):
    """A run capped at 2 s of training (of 100,000 steps) stops part way, saves that step and summarises it; the
    golf optimizer's wall-clock lr scale is in the checkpointed optimizer state, warming down (warmdown longer
    than the run: below 1 from the start); --resume with a larger cap continues from the saved step."""
    import json
    from pathlib import Path

    from jaxchat.cli import main
    from jaxchat.run import Run

    ref = json.loads((Path(__file__).parent / "golden" / "tiny-micro-20.json").read_text())
    sets = [s for s in ref["set"] if not s.startswith(("train.num_steps", "train.save_every", "train.eval_every",
                                                        "train.keep_every"))]
    sets += ["train.num_steps=100000", "train.save_every=0", "train.eval_every=0", "optim.optimizer=golf",
             'optim.groups={"warmdown_iters": 1000000}']
    args = [a for s in sets for a in ("--set", s)]
    run_dir = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--run-dir", str(run_dir)] + args
                + ["--set", "train.max_seconds=2"]) == 0
    s1 = json.loads((run_dir / "summary.json").read_text())
    assert s1["stopped_at_max_seconds"] and 0 < s1["step"] < 100000
    assert s1["time_s"]["train"] >= 2.0 and [int(p.name) for p in (run_dir / "checkpoints").iterdir()] == [s1["step"]]
    scale = float(Run.load(run_dir, tokenizer=False).state["opt_state"].hyperparams["lr_scale_now"])
    assert 0.0 < scale < 1.0
    assert main(["train", "--preset", "tiny", "--run-dir", str(run_dir), "--resume"] + args
                + ["--set", "train.max_seconds=4"]) == 0
    s2 = json.loads((run_dir / "summary.json").read_text())
    assert s2["stopped_at_max_seconds"] and s1["step"] < s2["step"] < 100000 and s2["time_s"]["train"] >= 4.0
