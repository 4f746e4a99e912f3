"""Sliding-window evaluation (golf/sliding.py) against PR #334's `eval_val_sliding` on its own model (the fixture's
`sliding_loss`), and the window layout against a hand count."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import fixture_path
from jaxchat.config import Config, ConfigError, DataConfig
from jaxchat.evaluate import make_eval_step
from jaxchat.golf.sliding import sliding_eval, windows
from jaxchat.interop.golf import config_from_golf, map_state_dict
from jaxchat.model.gpt import param_dict
from jaxchat.train import ModelFns


@functools.lru_cache(maxsize=1)
def golf_fixture():
    d = np.load(fixture_path("golf_pr334_tiny.npz"))
    cfg = config_from_golf(str(d["config"]), sequence_len=int(d["sliding_seq_len"]), compute_dtype="float32")
    model = map_state_dict({k[6:]: d[k] for k in d.files if k.startswith("param/")}, cfg)[0]
    return d, Config(model=cfg, data=DataConfig(tokenizer_vocab=512)), model, param_dict(model)


def _nll64(logits, x, y):
    """float64 NLL of targets y after inputs x, from the model's logits (the parity of those logits with the
    reference's is tests/test_interop.py::test_golf_npz_import)."""
    lg = np.asarray(logits(jnp.asarray(x[None], jnp.int32)), np.float64)[0]
    m = lg.max(-1)
    lse = m + np.log(np.exp(lg - m[:, None]).sum(-1))
    return lse - lg[np.arange(len(y)), y]


def test_windows_cover_every_target():
    """Hand count, n = 300 targets, context 32, stride 8: full windows at 0..264, one aligned to the end at 268.
    `once` scores each target exactly once; the reference's end window re-scores 292..295 (8 - 268 % 8 = 4)."""
    wins = windows(300, 32, 8, "reference")
    assert [w[0] for w in wins] == list(range(0, 265, 8)) + [268]
    assert wins[0] == (0, 0) and wins[1] == (8, 24) and wins[-1] == (268, 24)
    for tail, twice in (("reference", 4), ("once", 0)):
        cover = np.zeros(300, int)
        for ws, first in windows(300, 32, 8, tail):
            cover[ws + first:ws + 32] += 1
        assert cover.min() == 1 and (cover == 2).sum() == twice
    assert windows(20, 32, 8) == [(0, 0)]  # shorter than one window: all of it, once
    assert windows(32 + 5 * 8, 32, 8, "once") == windows(32 + 5 * 8, 32, 8, "reference")  # no end window
    with pytest.raises(ConfigError, match="stride"):
        windows(300, 32, 33)
    with pytest.raises(ConfigError, match="tail"):
        windows(300, 32, 8, "twice")


@pytest.mark.parametrize("batch", [5, 64])
def test_sliding_loss_equals_pr334(batch):
    """The fixture's `sliding_loss` is the reference eval_val_sliding's mean NLL on `stream` (301 tokens, seq_len
    32, stride 8): equal within 1e-5, whatever the batch of windows (5: seven batches, the last padded)."""
    d, cfg, _, params = golf_fixture()
    ones = np.ones(cfg.model.padded_vocab_size, np.int32)  # 1 byte per token: bpb = loss / ln 2
    out = sliding_eval(make_eval_step(ModelFns(cfg), ones), params, d["stream"], int(d["sliding_seq_len"]),
                       int(d["sliding_stride"]), batch_size=batch)
    ref = float(d["sliding_loss"])
    assert ref > 1.0 and out["val_loss"] > 1.0
    assert abs(out["val_loss"] - ref) <= 1e-5, (out["val_loss"], ref)
    assert out["val_tokens"] == 304 and out["windows"] == 35
    assert abs(out["val_bpb"] - ref / np.log(2)) <= 2e-5


def test_sliding_once_against_numpy_loop():
    """tail="once" against a float64 loop written here, window by window, each target once; and it differs from
    the reference variant (which re-scores 4 targets) on this stream."""
    d, cfg, _, params = golf_fixture()
    fns = ModelFns(cfg)
    logits = jax.jit(lambda x: fns.logits(params, x))
    s, L, S = d["stream"].astype(np.int64), 32, 8
    n = len(s) - 1
    tot, cnt, done = 0.0, 0, 0
    starts = list(range(0, n - L + 1, S)) + [n - L]
    for ws in starts:
        nll = _nll64(logits, s[ws:ws + L], s[ws + 1:ws + L + 1])
        tot, cnt, done = tot + nll[done - ws:].sum(), cnt + L - (done - ws), ws + L
    assert cnt == n
    ones = np.ones(cfg.model.padded_vocab_size, np.int32)
    out = sliding_eval(make_eval_step(ModelFns(cfg), ones), params, s, L, S, batch_size=16, tail="once")
    assert out["val_tokens"] == 300
    assert abs(out["val_loss"] - tot / cnt) <= 1e-5
    assert abs(out["val_loss"] - float(d["sliding_loss"])) > 1e-4  # the two tails really differ here
