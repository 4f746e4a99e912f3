"""Test-time training (golf/ttt.py) on PR #334's fixture model: score-first never scores a chunk with params that
trained on it (the order of operations, each chunk rescored here with the params before its training, and scores
that do not move when only later chunks change), the last chunk is never trained, frozen parts stay put; full TTT
trains before scoring and says it is not leaderboard-legal."""

import jax
import numpy as np
import pytest

from test_golf_sliding import golf_fixture
from jaxchat.config import ConfigError
from jaxchat.golf.sliding import windows
from jaxchat.golf.ttt import TTTConfig, full_ttt, score_first_ttt
from jaxchat.train import ModelFns

L, S, C = 32, 8, 64  # context, stride, chunk: 300 targets -> chunks of targets [0,64) [64,128) ... [256,300)
CFG = TTTConfig(lr=0.05, momentum=0.9, epochs=2, chunk_tokens=C, grad_clip=1.0, freeze_blocks=1, batch_size=2)


def _leaves(params):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


_JITTED = {}


def _score(fns, params, stream, wins):
    """Mean NLL of `wins` (start, first scored offset) computed here from the model's logits in float64."""
    logits = _JITTED.setdefault(id(fns), jax.jit(fns.logits))  # (one compile for every rescoring)
    tot, cnt = 0.0, 0
    for ws, first in wins:
        lg = np.asarray(logits(params, stream[None, ws:ws + L]), np.float64)[0]
        m = lg.max(-1)
        nll = m + np.log(np.exp(lg - m[:, None]).sum(-1)) - lg[np.arange(L), stream[ws + 1:ws + L + 1]]
        tot, cnt = tot + nll[first:].sum(), cnt + L - first
    return tot / cnt


@pytest.fixture(scope="module")
def ttt_run():
    d, cfg, _, params = golf_fixture()
    fns = ModelFns(cfg)
    ones = np.ones(cfg.model.padded_vocab_size, np.int32)
    events = []
    out = score_first_ttt(fns, params, ones, d["stream"], L, S, CFG, seq_len=L, eval_batch=8,
                          on_event=lambda kind, c, p: events.append((kind, c, _leaves(p))))
    return d, fns, params, ones, out, events


def test_each_chunk_is_scored_before_it_is_trained_and_the_last_never(ttt_run):
    *_, out, events = ttt_run
    assert [(k, c) for k, c, _ in events] == [("score", 0), ("train", 0), ("score", 1), ("train", 1),
                                              ("score", 2), ("train", 2), ("score", 3), ("train", 3), ("score", 4)]
    assert out["legal"] is True and len(out["chunks"]) == 5


def test_chunk_scores_use_the_params_from_before_its_training(ttt_run):
    """Chunk k's reported score equals a float64 rescoring, written here, of the windows whose scored targets
    start in chunk k with the params that existed before chunk k was trained on (the originals for chunk 0,
    those after training chunk k-1 otherwise); and those differ from the params after training chunk k."""
    d, fns, params, _, out, events = ttt_run
    stream = d["stream"].astype(np.int32)
    after_train = {c: p for k, c, p in events if k == "train"}
    orig = _leaves(params)
    tree = jax.tree_util.tree_structure(params)
    wins = windows(300, L, S)
    for k in (0, 2, 4):
        mine = [w for w in wins if min((w[0] + w[1]) // C, 4) == k]
        before = orig if k == 0 else after_train[k - 1]
        p = jax.tree_util.tree_unflatten(tree, [before[key] for key in orig])
        ref = _score(fns, p, stream, mine)
        assert abs(out["chunks"][k]["val_loss"] - ref) <= 1e-5, (k, out["chunks"][k]["val_loss"], ref)
        if k < 4:
            trained = jax.tree_util.tree_unflatten(tree, [after_train[k][key] for key in orig])
            assert abs(_score(fns, trained, stream, mine) - ref) > 1e-4  # training on chunk k would show
    assert out["after"]["val_loss"] != out["before"]["val_loss"]


def test_later_chunks_do_not_change_earlier_scores(ttt_run):
    """Replace every token after target 128 (chunks 2..4) with other tokens: chunks 0 and 1 score bitwise the same
    (nothing from later in the stream reaches an earlier score), chunk 2 does not."""
    d, fns, params, ones, out, _ = ttt_run
    other = d["stream"].astype(np.int32).copy()
    other[129:] = np.random.default_rng(0).integers(0, 512, len(other) - 129)
    alt = score_first_ttt(fns, params, ones, other, L, S, CFG, seq_len=L, eval_batch=8)
    assert alt["chunks"][:2] == out["chunks"][:2]
    assert alt["chunks"][2] != out["chunks"][2]


def test_frozen_parts_stay_and_the_rest_trains(ttt_run):
    _, _, params, _, out, _ = ttt_run
    a, b = _leaves(params), _leaves(out["params"])
    for key in a:
        same = np.array_equal(a[key], b[key])
        if key.startswith(("['wte']", "['bigram']", "['smear_v1_gate']", "['blocks'][0]")):
            assert same, key
        elif key.startswith(("['blocks'][1]", "['blocks'][2]", "['skip_weights']")):
            assert not same, key
    assert np.array_equal(a["['resid_mix']"][0], b["['resid_mix']"][0])  # block 0's row of the stacked tensor
    assert not np.array_equal(a["['resid_mix']"][1:], b["['resid_mix']"][1:])


@pytest.mark.slow
def test_full_ttt_trains_first_and_says_it_is_not_legal():
    d, cfg, _, params = golf_fixture()
    ones = np.ones(cfg.model.padded_vocab_size, np.int32)
    full = TTTConfig(lr=0.05, momentum=0.9, epochs=1, grad_clip=0.0, freeze_blocks=2, batch_size=1,
                     chunk_tokens=C)
    out = full_ttt(ModelFns(cfg), params, ones, d["stream"], L, S, full, seq_len=L, eval_batch=8)
    assert out["legal"] is False
    assert abs(out["before"]["val_loss"] - float(d["sliding_loss"])) <= 1e-5  # before: the plain sliding score
    assert out["after"]["val_loss"] < out["before"]["val_loss"] - 1e-3  # it trained on what it scores
    with pytest.raises(ConfigError, match=r"--ttt-freeze-blocks 4 must be in \[0, 3\]"):
        full_ttt(ModelFns(cfg), params, ones, d["stream"], L, S, TTTConfig(freeze_blocks=4), seq_len=L)
    with pytest.raises(ConfigError, match="--ttt-chunk 60 must be a positive multiple of the stride"):
        score_first_ttt(ModelFns(cfg), params, ones, d["stream"], L, S, TTTConfig(chunk_tokens=60), seq_len=L)
