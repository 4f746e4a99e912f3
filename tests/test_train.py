"""The train step: gradient accumulation, checkpoint round trip, the non-finite guard."""

from dataclasses import replace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchat.checkpoint import Checkpointer
from jaxchat.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
from jaxchat.optim import build_optimizer
from jaxchat.train import ModelFns, abstract_state, init_state, make_train_step, shaped_batch

V = 320


def small_cfg(**train) -> Config:
    return Config(model=ModelConfig(vocab_size=V, sequence_len=32, n_layer=2, n_embd=64, n_head=2, n_kv_head=1),
                  optim=OptimConfig(lr=1e-2, warmup_steps=0), data=DataConfig(tokenizer_vocab=V),
                  train=TrainConfig(num_steps=10, batch_size=8, **train))


def data(seed=0):
    rows = np.random.default_rng(seed).integers(0, V, (8, 33)).astype(np.int32)
    return rows[:, :-1], rows[:, 1:]


def leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def setup():
    cfg = small_cfg()
    fns = ModelFns(cfg)
    opt = build_optimizer(cfg, None)
    return cfg, fns, opt, make_train_step(fns, opt)


@pytest.fixture(scope="module")
def params0(setup):
    """init_state's params for seed 0, made once (each init_state call compiles the init again)."""
    return setup[1].init_params(0)


def fresh_state(params0, opt):
    """init_state(fns, opt, 0) from the shared params, committed to the device as the loop's state is (a restored
    checkpoint is committed too, so both run the same compiled step)."""
    params = jax.tree.map(jnp.copy, params0)
    state = {"params": params, "opt_state": opt.init(params), "step": jnp.int32(0), "skipped": jnp.int32(0)}
    return jax.device_put(state, jax.devices()[0])


def test_fresh_state_is_init_state(setup, params0):
    _, fns, opt, _ = setup
    a, b = init_state(fns, opt, 0), fresh_state(params0, opt)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    assert all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b)))


def test_grad_accumulation_equals_large_batch(setup, params0):
    """Plain SGD makes the update linear in the gradient, so equal params mean equal gradients (AdamW's first
    step is ~lr * sign(g) and would hide or exaggerate differences in near-zero gradients)."""
    import optax

    cfg, fns, _, _ = setup
    sgd = optax.sgd(0.5)
    step = make_train_step(fns, sgd)
    x, y = data()
    init = leaves(params0)
    s1, m1 = step(fresh_state(params0, sgd), shaped_batch(x, y, 1))
    s4, m4 = step(fresh_state(params0, sgd), shaped_batch(x, y, 4))  # 4 micro-batches of 2
    moved = [np.abs(a - b).max() for a, b in zip(leaves(s1["params"]), init)]
    assert sum(m > 0 for m in moved) >= 5 and max(moved) > 1e-3  # (zero-init c_proj blocks the rest at step 0)
    np.testing.assert_allclose(float(m1["loss"]), float(m4["loss"]), rtol=1e-6)
    # the reported loss is the mean token NLL, by hand: float64 log-softmax of the model's logits
    logits = np.asarray(fns.logits(params0, jnp.asarray(x)), np.float64)[..., :V]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, y[..., None], -1).mean()
    assert nll > 1.0 and float(m4["loss"]) == pytest.approx(nll, rel=1e-4)
    for a, b, i in zip(leaves(s1["params"]), leaves(s4["params"]), init):
        np.testing.assert_allclose(a - i, b - i, atol=2e-7, rtol=1e-4)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_checkpoint_round_trip_continues_identically(setup, params0, tmp_path, optimizer):
    cfg, fns, opt, step = setup
    if optimizer == "muon":  # nanochat's recipe: Muon momenta and second moments, per-group AdamW states
        cfg = Config(model=cfg.model, optim=OptimConfig(optimizer="muon"), data=cfg.data, train=cfg.train)
        opt = build_optimizer(cfg)
        step = make_train_step(fns, opt)
    state = fresh_state(params0, opt)
    for i in range(3):
        state, _ = step(state, shaped_batch(*data(i), 1))
    ck = Checkpointer(tmp_path, keep_last=2)
    ck.save(3, state, {"config": cfg.to_dict()})
    ck.close()
    ck = Checkpointer(tmp_path)
    restored, meta = ck.restore(abstract_state(fns, opt))
    ck.close()
    assert meta["config"]["model"]["n_embd"] == 64 and int(restored["step"]) == 3
    for a, b in zip(leaves(state), leaves(restored)):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    batch = shaped_batch(*data(3), 1)
    s_a, m_a = step(restored, batch)
    s_b, m_b = step(state, batch)
    assert float(m_a["loss"]) == float(m_b["loss"]) and np.isfinite(float(m_a["loss"]))
    assert all(np.array_equal(a, b) for a, b in zip(leaves(s_a), leaves(s_b)))


def test_nonfinite_update_is_discarded(setup, params0):
    cfg, fns, opt, step = setup
    state = fresh_state(params0, opt)
    state["params"]["x0_lambdas"] = state["params"]["x0_lambdas"].at[0].set(jnp.nan)  # poisons the forward
    before = leaves(state)
    new, m = step(jax.tree.map(jnp.copy, state), shaped_batch(*data(), 1))
    assert not bool(m["finite"]) and int(m["skipped"]) == 1
    after = leaves(new)
    # everything except the step counters is untouched
    same = [np.array_equal(a, b, equal_nan=True) for a, b in zip(before, after)]
    assert sum(not s for s in same) == 2  # `step` and `skipped`


def test_step_compiler_options_only_on_hopper_or_newer_gpus(monkeypatch):
    from jaxchat.train import TRITON_FUSIONS, step_compiler_options

    monkeypatch.setenv("XLA_FLAGS", "")
    assert step_compiler_options((9, 0)) == step_compiler_options((10, 0)) == {TRITON_FUSIONS: True}
    assert step_compiler_options((8, 0)) == {}  # A100: not measured
    assert step_compiler_options(None) == {}  # no CUDA GPU: CPU, TPU, ROCm
    monkeypatch.setenv("XLA_FLAGS", f"--{TRITON_FUSIONS}=false")  # the user's XLA_FLAGS wins
    assert step_compiler_options((9, 0)) == {}
    monkeypatch.setenv("XLA_FLAGS", "")
    if jax.default_backend() == "cpu":
        assert step_compiler_options() == {}


def test_train_step_compiles_with_its_compiler_options(setup, params0, monkeypatch):
    """make_train_step hands step_compiler_options() to XLA: an option XLA does not know is refused at compile
    time (on an H100 the real option's effect is measured by `jaxchat bench`: BENCHMARKS.md, session 6)."""
    from jaxchat import train

    _, fns, opt, _ = setup
    state, batch = fresh_state(params0, opt), shaped_batch(*data(), 1)
    monkeypatch.setattr(train, "step_compiler_options", lambda: {"xla_jaxchat_no_such_option": True})
    with pytest.raises(Exception, match="xla_jaxchat_no_such_option"):
        train.make_train_step(fns, opt).lower(state, batch).compile()


def test_check_batch_fits_by_hand():
    from jaxchat.config import ConfigError
    from jaxchat.train import check_batch_fits

    assert check_batch_fits(small_cfg(grad_accum=2), 4) == 4  # 8 / 2 = 4 sequences per micro-batch, 1 per device
    assert check_batch_fits(small_cfg(), 1) == 8
    with pytest.raises(ConfigError, match="micro-batch of 4 sequences.*does not divide over 3 devices"):
        check_batch_fits(small_cfg(grad_accum=2), 3)


def test_one_device_is_the_first_local_device():
    """eval, sample and export restore the state whole onto the first local device."""
    import jax
    from jaxchat.train import one_device
    assert one_device().device_set == {jax.devices()[0]}


def with_streams(cfg: Config, streams: int) -> Config:
    return replace(cfg, model=replace(cfg.model, batch_streams=streams))


def test_batch_streams_compute_the_same_step(params0):
    """model.batch_streams=2 (the micro-batch as two branches of one program, rows 0, 2, 4, ... and 1, 3, 5, ...)
    and 4 against one stream: the same loss and, through plain SGD (the update linear in the gradient), the same
    gradients, to fp32 summation order; with grad accumulation too."""
    import optax

    sgd = optax.sgd(0.5)
    x, y = data()
    init = leaves(params0)
    results = {}
    for streams, accum in [(1, 1), (2, 1), (4, 1), (2, 2)]:
        cfg = with_streams(small_cfg(), streams)
        step = make_train_step(ModelFns(cfg), sgd)
        state, m = step(fresh_state(params0, sgd), shaped_batch(x, y, accum))
        results[streams, accum] = float(m["loss"]), [a - i for a, i in zip(leaves(state["params"]), init)]
    loss1, delta1 = results[1, 1]
    assert 5.0 < loss1 < 6.5  # ln(320) = 5.77: a fresh model on random tokens
    moved = [np.abs(d).max() for d in delta1]
    assert sum(m > 0 for m in moved) >= 5 and max(moved) > 1e-3  # (zero-init c_proj blocks the rest at step 0)
    for key, (loss, delta) in results.items():
        assert loss == pytest.approx(loss1, rel=1e-6), key
        for a, b in zip(delta, delta1):
            np.testing.assert_allclose(a, b, atol=2e-7, rtol=1e-4)


def test_batch_streams_auto_and_errors():
    """-1 (auto): 2 on a one-device CPU run whose micro-batch halves into >= STREAM_TOKENS tokens each, else 1
    (small test batches keep one stream); an explicit count must divide each device's micro-batch."""
    from jaxchat.config import ConfigError
    from jaxchat.train import STREAM_TOKENS, check_batch_fits, resolve_streams

    assert ModelConfig().batch_streams == -1 and jax.device_count() == 1
    assert resolve_streams(-1, 16, 256) == 2  # tiny: two slices of 2048 tokens
    assert resolve_streams(-1, 8, 512) == 2  # cpu-bench
    assert resolve_streams(-1, 8, 32) == 1  # 128 tokens a slice: below STREAM_TOKENS
    assert resolve_streams(-1, 1, 2 * STREAM_TOKENS) == 1  # one sequence does not split
    assert resolve_streams(-1, 3, STREAM_TOKENS) == 1  # an odd micro-batch does not halve
    assert resolve_streams(3, 6, 32) == 3
    with pytest.raises(ConfigError, match=r"model.batch_streams=0 must be a positive integer"):
        ModelConfig(batch_streams=0)
    cfg = with_streams(small_cfg(grad_accum=2), 3)  # 4 sequences per micro-batch
    with pytest.raises(ConfigError, match=r"model.batch_streams=3 does not divide the 4 sequences of each device"):
        check_batch_fits(cfg, 1)
    with pytest.raises(ConfigError, match=r"model.batch_streams=3 does not divide the 2 sequences"):
        check_batch_fits(cfg, 2)


STREAMS_ON_A_MESH = r"""
import json, sys
import jax, numpy as np, optax
from jaxchat.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
from jaxchat.run import Run
from jaxchat.train import batch_sharding, init_state, make_train_step, replicated, shaped_batch
out = {}
rows = np.random.default_rng(0).integers(0, 320, (8, 33)).astype(np.int32)
for streams in (1, 2):
    cfg = Config(model=ModelConfig(vocab_size=320, sequence_len=32, n_layer=2, n_embd=64, n_head=2, n_kv_head=1,
                                   batch_streams=streams),
                 optim=OptimConfig(lr=1e-2, warmup_steps=0), data=DataConfig(tokenizer_vocab=320),
                 train=TrainConfig(num_steps=1, batch_size=8))
    run = Run.build(cfg)
    state = jax.device_put(init_state(run.fns, optax.sgd(0.5), 0), replicated(run.mesh))
    init_head = np.array(state["params"]["lm_head"]["kernel"])  # (the step donates the state)
    batch = jax.device_put(shaped_batch(rows[:, :-1], rows[:, 1:], 1), batch_sharding(run.mesh))
    with jax.set_mesh(run.mesh):
        new, m = make_train_step(run.fns, optax.sgd(0.5))(state, batch)
    head = np.asarray(new["params"]["lm_head"]["kernel"])
    out[streams] = {"devices": run.mesh.size, "loss": float(m["loss"]), "head": head.ravel()[:4000].tolist(),
                    "moved": float(np.abs(head - init_head).max())}
json.dump(out, sys.stdout)
"""


def test_batch_streams_on_a_data_parallel_mesh():
    """Explicit streams under a 2-device mesh (each device's 4 rows hold 2 of each slice): the same loss and
    lm_head update as one stream."""
    import json
    import subprocess
    import sys

    from conftest import child_env

    env = child_env(XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.run([sys.executable, "-c", STREAMS_ON_A_MESH], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    one, two = out["1"], out["2"]
    assert one["devices"] == two["devices"] == 2
    assert 5.0 < one["loss"] < 6.5 and two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert one["moved"] > 1e-3
    np.testing.assert_allclose(two["head"], one["head"], atol=2e-7, rtol=1e-5)
