"""The train step: gradient accumulation, checkpoint round trip, the non-finite guard."""

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
