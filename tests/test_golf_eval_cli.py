"""`jaxchat eval --stride/--ttt/--weights`, `sample --weights` and `export --weights` end to end on a micro run
trained with EMA and SWA on. Slow (a training run, then every command compiles its own step): the functions
underneath are tested fast in test_averaging.py, test_golf_sliding.py and test_golf_ttt.py."""

import json

import numpy as np
import pytest
import safetensors.numpy as safetensors

from jaxchat.cli import main
from test_cli import MICRO

pytestmark = pytest.mark.slow

AVG = ["--set", "train.num_steps=6", "--set", "optim.warmup_steps=0", "--set", "train.ema_decay=0.9", "--set",
       "train.swa_lr_below=0.9", "--set", "train.eval_every=0"]


@pytest.fixture(scope="module")
def averaged(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "avg"
    assert main(["train", "--preset", "tiny", "--run-dir", str(run)] + MICRO + AVG) == 0
    return run


def _bpb(out: str) -> float:
    return float(out.split("val bpb ")[1].split()[0])


def test_weights_choose_what_eval_sample_and_export_use(averaged, tmp_path, capsys):
    capsys.readouterr()
    got = {}
    for w in ("raw", "ema", "swa"):
        assert main(["eval", "--run", str(averaged), "--batch-size", "4", "--weights", w]) == 0
        out = capsys.readouterr().out
        assert (f"({w} weights)" in out) == (w != "raw")
        got[w] = _bpb(out)
    assert len(set(got.values())) == 3 and all(0 < v < 20 for v in got.values())
    assert main(["sample", "--run", str(averaged), "--max-tokens", "4", "--weights", "swa"]) == 0
    for w in ("raw", "ema"):
        assert main(["export", str(averaged), "--out", str(tmp_path / w), "--weights", w]) == 0
    assert json.loads((tmp_path / "ema" / "config.json").read_text())["weights"] == "ema"
    raw, ema = (safetensors.load_file(str(tmp_path / w / "model.safetensors")) for w in ("raw", "ema"))
    assert raw.keys() == ema.keys() and any(not np.array_equal(raw[k], ema[k]) for k in raw)


def test_sliding_and_ttt_from_the_command_line(averaged, capsys):
    capsys.readouterr()
    assert main(["eval", "--run", str(averaged), "--batch-size", "4", "--stride", "16", "--tokens", "512"]) == 0
    out = capsys.readouterr().out
    assert "sliding window (context 64, stride 16" in out and "chunks of 64 on the same tokens" in out
    assert main(["eval", "--run", str(averaged), "--batch-size", "4", "--stride", "16", "--tokens", "512", "--ttt",
                 "score-first", "--ttt-chunk", "128", "--ttt-epochs", "1", "--ttt-freeze-blocks", "1"]) == 0
    out = capsys.readouterr().out
    assert "score-first TTT" in out and "leaderboard-legal" in out and "NOT" not in out and " -> " in out
    assert main(["eval", "--run", str(averaged), "--batch-size", "4", "--stride", "16", "--tokens", "512", "--ttt",
                 "full", "--ttt-epochs", "1", "--ttt-freeze-blocks", "1"]) == 0
    assert "NOT leaderboard-legal" in capsys.readouterr().out


@pytest.mark.parametrize("argv,needle", [
    (["--context", "32"], "add --stride"), (["--ttt", "full"], "add --stride"),
    (["--stride", "65"], "--stride 65 must be between 1 and the context (64)"),
    (["--stride", "16", "--ttt", "score-first", "--ttt-chunk", "100"], "--ttt-chunk 100 must be a positive "
                                                                         "multiple of the stride (16)")])
def test_bad_eval_flags_are_refused_by_name(averaged, argv, needle, capsys):
    assert main(["eval", "--run", str(averaged)] + argv) == 2
    assert needle in capsys.readouterr().err
