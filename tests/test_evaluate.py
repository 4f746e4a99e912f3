"""evaluate.py against hand computations: bpb counts the bytes of the *targets* (a row's tokens 1..T), never of the
inputs (tokens 0..T-1); special tokens (0 bytes) add neither bytes nor NLL to bpb; sums run over every batch.

The byte table is made up for the test so that input bytes and target bytes differ: the rows start with a 0-byte
token (BOS, an input only) and end with a 4-byte token (a target only). The per-token NLL reference is float64
numpy log-softmax of the model's own logits (fp32 compute), so the check is on evaluate's bookkeeping."""

import gzip
import lzma
import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxchat.config import Config, DataConfig, ModelConfig
from jaxchat.evaluate import compressor_bpb, eval_rows, evaluate, make_eval_step, target_bytes
from jaxchat.train import ModelFns

V = 320  # the smallest vocab Config accepts (256 bytes + specials + merges), a multiple of 64
# bytes per token id: 0 and 15 are specials (0 bytes), 1..14 have 1..4 bytes; ids >= 16 never occur
BYTES = np.concatenate([[0, 1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 0], np.full(V - 16, 7)]).astype(np.int32)
ROWS = np.array([[0, 5, 9, 3, 15, 8],    # inputs 0 5 9 3 15, targets 5 9 3 15 8
                 [0, 2, 2, 15, 7, 4],    # inputs 0 2 2 15 7,  targets 2 2 15 7 4
                 [0, 1, 12, 6, 3, 12],   # inputs 0 1 12 6 3,  targets 1 12 6 3 12
                 [0, 15, 10, 0, 14, 4]])  # inputs 0 15 10 0 14, targets 15 10 0 14 4 (id 0 is a target too)
# written out by hand from BYTES and the target columns above
TARGET_BYTES = (1 + 1 + 3 + 0 + 4) + (2 + 2 + 0 + 3 + 4) + (1 + 4 + 2 + 3 + 4) + (0 + 2 + 0 + 2 + 4)  # 42
INPUT_BYTES = (0 + 1 + 1 + 3 + 0) + (0 + 2 + 2 + 0 + 3) + (0 + 1 + 4 + 2 + 3) + (0 + 0 + 2 + 0 + 2)  # 26


@pytest.fixture(scope="module")
def model():
    model = ModelConfig(vocab_size=V, sequence_len=8, n_layer=1, n_embd=32, n_head=2, n_kv_head=1, smear_channels=8,
                        ve_gate_channels=4, compute_dtype="float32")
    cfg = Config(data=DataConfig(tokenizer_vocab=V), model=model)
    fns = ModelFns(cfg)
    return fns, fns.init_params(3)


def nll_ref(fns, params, rows):
    """float64 per-target NLL of rows (N, T+1) from the model's logits."""
    logits = np.asarray(fns.logits(params, jnp.asarray(rows[:, :-1])), np.float64)[..., :V]
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, rows[:, 1:, None], -1)[..., 0]


def test_the_batch_tells_input_bytes_from_target_bytes():
    assert BYTES[ROWS[:, 1:]].sum() == TARGET_BYTES == 42 and BYTES[ROWS[:, :-1]].sum() == INPUT_BYTES == 26


@pytest.mark.parametrize("batch_size", [4, 1])  # one batch; four, summed
def test_bpb_and_byte_counts_by_hand(model, batch_size):
    fns, params = model
    nll = nll_ref(fns, params, ROWS)
    assert nll.min() > 0.5  # a real NLL, not a trivial value
    counted = BYTES[ROWS[:, 1:]] > 0
    out = evaluate(make_eval_step(fns, BYTES), params, ROWS, batch_size)
    assert out["val_bytes"] == TARGET_BYTES and out["val_tokens"] == ROWS[:, 1:].size == 20
    assert out["val_loss"] == pytest.approx(nll.mean(), rel=1e-5)
    assert out["val_bpb"] == pytest.approx(nll[counted].sum() / (math.log(2) * TARGET_BYTES), rel=1e-5)
    # the specials' NLL is left out of bpb (3 of the 20 tokens here), their tokens are in val_loss
    assert abs(out["val_bpb"] - nll.sum() / (math.log(2) * TARGET_BYTES)) > 1e-3


def test_masked_targets_count_no_tokens_no_bytes(model):
    """Targets < 0 (padding) add nothing: not to the NLL, the token count, or the bytes."""
    fns, params = model
    step = make_eval_step(fns, BYTES)
    x, y = ROWS[:, :-1], ROWS[:, 1:].copy()
    full = step(params, x, y)
    y[:, -1] = -1
    nll = nll_ref(fns, params, ROWS)
    out = step(params, x, y)
    assert int(out["tokens"]) == 16 and int(full["tokens"]) == 20
    assert int(out["bytes"]) == TARGET_BYTES - 4 * 4 and int(full["bytes"]) == TARGET_BYTES
    assert float(out["nll"]) == pytest.approx(nll[:, :-1].sum(), rel=1e-5)
    assert float(out["nll_bytes"]) == pytest.approx(nll[:, :-1][BYTES[ROWS[:, 1:-1]] > 0].sum(), rel=1e-5)


def test_eval_rows_by_hand():
    rows = np.arange(10 * 9).reshape(10, 9)  # T = 8 targets per row
    assert eval_rows(rows, 2, 24).shape[0] == 2   # ceil(24 / 8) = 3 rows, down to a multiple of 2
    assert eval_rows(rows, 2, 33).shape[0] == 4   # ceil(33 / 8) = 5 -> 4
    assert eval_rows(rows, 4, 8).shape[0] == 4    # at least one batch
    assert eval_rows(rows, 2, 10_000).shape[0] == 10  # never more than there are
    assert eval_rows(rows[:3], 4, 100).shape[0] == 3  # fewer rows than a batch: all of them
    np.testing.assert_array_equal(eval_rows(rows, 2, 24), rows[:2])  # the first ones


class Tok:
    """A byte-level tokenizer written for the test: id i < 256 is byte i, 256 is BOS."""
    bos_id = 256
    special_ids = (256,)

    def decode(self, ids):
        return bytes(ids).decode("utf-8")


def test_target_bytes_are_the_targets_without_specials():
    rows = np.array([[256, 104, 105, 256, 33], [104, 256, 111, 107, 46]])
    assert target_bytes(Tok(), rows) == b"hi!" + b"ok."


def test_compressor_bpb_is_eight_times_the_compressed_ratio():
    data = bytes(range(256)) * 8
    out = compressor_bpb(data)
    assert out["gzip_bpb"] == 8 * len(gzip.compress(data, compresslevel=9)) / 2048
    assert out["xz_bpb"] == 8 * len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)) / 2048
    assert 0 < out["gzip_bpb"] < 8 and out["gzip_bpb"] != out["xz_bpb"]


def test_rows_split_over_the_mesh_give_the_same_numbers(model):
    """The sharded path (rows placed over a data mesh, here of every local device) equals the plain one."""
    from jaxchat.train import make_mesh, rows_sharding

    fns, params = model
    step = make_eval_step(fns, BYTES)
    plain = evaluate(step, params, ROWS, 4)
    sharded = evaluate(step, params, ROWS, 4, sharding=rows_sharding(make_mesh()))
    assert sharded["val_bytes"] == plain["val_bytes"] == TARGET_BYTES
    assert sharded["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-6)
    assert sharded["val_bpb"] == pytest.approx(plain["val_bpb"], rel=1e-6)
