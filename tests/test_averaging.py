"""EMA and SWA of the params (averaging.py) against float64 numpy averages of the raw params recorded after every
step, with the lr schedule written out here; --weights selection and its errors."""

import math

import jax
import numpy as np
import pytest

from jaxchat.averaging import Averaging, select_weights
from jaxchat.checkpoint import CheckpointError
from jaxchat.config import Config, ConfigError, DataConfig, ModelConfig, OptimConfig, TrainConfig
from jaxchat.optim import build_optimizer
from jaxchat.train import ModelFns, init_state, make_train_step, shaped_batch

V, N, WARMUP, LR, END = 320, 12, 2, 1e-2, 0.05
DECAY, BELOW, EVERY = 0.9, 0.6, 2


def cfg_with(**train) -> Config:
    return Config(model=ModelConfig(vocab_size=V, sequence_len=16, n_layer=1, n_embd=32, n_head=2, n_kv_head=1),
                  optim=OptimConfig(lr=LR, warmup_steps=WARMUP, end_lr_frac=END),
                  data=DataConfig(tokenizer_vocab=V), train=TrainConfig(num_steps=N, batch_size=4, **train))


def lr_scale(i: int) -> float:
    """AdamW's warmup-cosine lr at optimizer step i over its peak (optax.warmup_cosine_decay_schedule: linear from 0
    over WARMUP steps, then cosine from 1 to END over the remaining N - WARMUP)."""
    if i < WARMUP:
        return i / WARMUP
    t = min(i - WARMUP, N - WARMUP) / (N - WARMUP)
    return END + (1 - END) * 0.5 * (1 + math.cos(math.pi * t))


def test_ema_and_swa_equal_numpy_averages():
    cfg = cfg_with(ema_decay=DECAY, swa_lr_below=BELOW, swa_every=EVERY)
    fns, opt, avg = ModelFns(cfg), build_optimizer(cfg, None), Averaging.from_config(cfg)
    step = make_train_step(fns, opt, averaging=avg)
    state = jax.device_put(init_state(fns, opt, 0, avg), jax.devices()[0])  # (committed: one compile)
    raw = [[np.asarray(x, np.float64) for x in jax.tree.leaves(state["params"])]]
    rng = np.random.default_rng(0)
    for _ in range(N):
        rows = rng.integers(0, V, (4, 17)).astype(np.int32)
        state, _ = step(state, shaped_batch(rows[:, :-1], rows[:, 1:], 1))
        raw.append([np.asarray(x, np.float64) for x in jax.tree.leaves(state["params"])])

    ema = raw[0]
    for p in raw[1:]:
        ema = [e * DECAY + q * (1 - DECAY) for e, q in zip(ema, p)]
    picked = [i for i in range(N) if i >= WARMUP and lr_scale(i) < BELOW and (i + 1) % EVERY == 0]
    assert 2 <= len(picked) < N - WARMUP  # a real subset: some steps in, some out
    swa = [np.mean([raw[i + 1][k] for i in picked], axis=0) for k in range(len(raw[0]))]

    got_ema = [np.asarray(x) for x in jax.tree.leaves(select_weights(state, "ema"))]
    got_swa = [np.asarray(x) for x in jax.tree.leaves(select_weights(state, "swa"))]
    assert int(state["avg"]["swa_count"]) == len(picked)
    for e, g, r in zip(ema, got_ema, raw[-1]):
        assert np.abs(g - e).max() <= 1e-6 * max(1.0, np.abs(e).max())
    for s, g, r in zip(swa, got_swa, raw[-1]):
        assert np.abs(g - s).max() <= 1e-6 * max(1.0, np.abs(s).max())
    moved = max(np.abs(a - b).max() for a, b in zip(raw[-1], raw[0]))
    assert moved > 1e-3  # the params moved, so the averages are not trivially the params
    assert max(np.abs(g - r).max() for g, r in zip(got_ema, raw[-1])) > 1e-4
    assert max(np.abs(g - r).max() for g, r in zip(got_swa, raw[-1])) > 1e-5
    raw_sel = [np.asarray(x) for x in jax.tree.leaves(select_weights(state, "raw"))]
    assert all(np.array_equal(a, b) for a, b in zip(raw_sel, raw[-1]))


def test_averaging_off_by_default_and_absent_weights_are_named():
    cfg = cfg_with()
    assert Averaging.from_config(cfg) is None
    fns, opt = ModelFns(cfg), build_optimizer(cfg, None)
    state = init_state(fns, opt, 0)
    assert "avg" not in state
    with pytest.raises(CheckpointError, match="no EMA weights.*train.ema_decay"):
        select_weights(state, "ema", "runs/x")
    with pytest.raises(CheckpointError, match="no SWA weights.*train.swa_lr_below"):
        select_weights(state, "swa", "runs/x")
    only_swa = cfg_with(swa_lr_below=0.4)
    state = init_state(fns, opt, 0, Averaging.from_config(only_swa))
    assert set(state["avg"]) == {"swa_sum", "swa_count"}
    with pytest.raises(CheckpointError, match="collected no SWA weights yet"):
        select_weights(state, "swa")


@pytest.mark.parametrize("key,value", [("ema_decay", 1.0), ("ema_decay", -0.1), ("swa_lr_below", 1.5),
                                       ("swa_every", 0)])
def test_bad_averaging_config_is_refused(key, value):
    with pytest.raises(ConfigError, match=f"train.{key}"):
        TrainConfig(**{key: value})
