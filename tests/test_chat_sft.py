"""`jaxchat sft`: the recipe as config changes, the loss mask folded into the rows, source weights, the held-out
split, and (slow) a SIGKILL then `--resume` bitwise equal to an uninterrupted run, on the tiny-micro model."""

import argparse
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import child_env, curve, evals, records
from jaxchat.chat.sft import encode_rows, parse_source, run_sft, sft_config, split, weigh
from jaxchat.checkpoint import SAVE_DELAY_ENV, SAVE_MARKER_ENV, Checkpointer
from jaxchat.data.loader import split_row
from jaxchat.cli import main
from jaxchat.config import ConfigError
from jaxchat.overrides import apply_overrides
from jaxchat.data.tokenizer import Tokenizer
from jaxchat.loop import run_training
from jaxchat.presets import get_preset

GOLDEN = Path(__file__).parent / "golden" / "tiny-micro-20.json"


def test_recipe_scales_every_lr_and_drops_decay():
    base = get_preset("nanochat-d12")
    groups = json.loads(sft_config(base, 10, 0, 0).optim.groups)
    assert groups["muon"] == {"lr": pytest.approx(0.016), "wd": 0.0}
    assert groups["wte"] == {"lr": pytest.approx(0.24), "wd": 0.0}
    assert (groups["warmup_steps"], groups["warmdown_ratio"], groups["final_lr_frac"]) == (0, 0.5, 0.0)
    base = apply_overrides(get_preset("tiny"), ["optim.optimizer=adamw", "optim.groups="])
    adamw = sft_config(base, 10, 0, 0).optim
    assert adamw.lr == pytest.approx(0.8 * base.optim.lr) and adamw.weight_decay == 0


def test_mask_rides_in_the_rows_and_the_loader_reads_it_back():
    rows = np.array([[1, 5, 6, 7, 1, 8]], np.int32)  # hand-built: BOS, user 5, assistant 6 7, BOS pad, ...
    masks = np.array([[0, 0, 1, 1, 0, 1]], np.int32)
    enc = encode_rows(rows, masks)
    assert enc.tolist() == [[-2, -6, 6, 7, -2, 8]]  # ~t = -t - 1 outside the mask
    x, y = split_row(enc)
    assert x.tolist() == [[1, 5, 6, 7, 1]] and y.tolist() == [[-1, 6, 7, -1, 8]]
    plain = np.array([[3, 4, 5]], np.int32)  # pretraining rows are untouched
    assert [a.tolist() for a in split_row(plain)] == [[[3, 4]], [[4, 5]]]


def test_sources_and_weights():
    assert parse_source("a.jsonl") == ("a.jsonl", 1.0)
    assert parse_source("a.jsonl:2") == ("a.jsonl", 2.0) and parse_source("dir/a.jsonl:0.5") == ("dir/a.jsonl", 0.5)
    with pytest.raises(ConfigError, match="must be a positive number"):
        parse_source("a.jsonl:0")
    convs = list("abcdefghij")
    assert weigh(convs, 1, 0) == convs and weigh(convs, 2, 0) == convs + convs
    half = weigh(convs, 0.5, 0)
    assert len(half) == 5 and len(set(half)) == 5 and set(half) <= set(convs)
    more = weigh(convs, 1.3, 0)
    assert len(more) == 13 and more[:10] == convs and set(more[10:]) <= set(convs)


def test_split_holds_out_every_twentieth():
    train, val = split(list(range(45)))
    assert val == [19, 39] and len(train) == 43
    assert split([0, 1]) == ([0], [1])
    with pytest.raises(ConfigError, match="at least 2"):
        split([0])


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    cfg = apply_overrides(get_preset("tiny"), json.loads(GOLDEN.read_text())["set"])
    cfg = apply_overrides(cfg, ["train.num_steps=2", "train.eval_every=0", "train.save_every=0",
                                "train.keep_every=0", "train.sample_tokens=0"])
    run = tmp_path_factory.mktemp("base") / "run"
    run_training(cfg, run, log=lambda *a: None)
    data = run.parent / "chats.jsonl"
    r = random.Random(0)
    with open(data, "w") as f:
        for _ in range(60):
            a, b = r.randint(1, 99), r.randint(1, 99)
            f.write(json.dumps({"messages": [{"role": "user", "content": f"add {a} and {b}"},
                                             {"role": "assistant", "content": f"it is {a + b}"}]}) + "\n")
    return run, data


def _leaves(run_dir, step):
    from jaxchat.optim import build_optimizer
    from jaxchat.rundir import load_run_config
    from jaxchat.train import ModelFns, abstract_state

    cfg = load_run_config(run_dir)
    ck = Checkpointer(run_dir, async_save=False, read_only=True)
    state, _ = ck.restore(abstract_state(ModelFns(cfg), build_optimizer(cfg, None)), step)
    ck.close()
    return jax.tree.leaves(state)


@pytest.mark.slow
def test_sft_trains_then_sigkill_and_resume_is_bitwise_exact(base_run, tmp_path, capsys):
    """An uninterrupted SFT run (6 steps, saves and evals every 2) against one SIGKILLed while the save of step
    4 is held (test hook) and step 5 is logged: `jaxchat sft --out --resume` continues from step 2 and ends with
    the same per-step losses, evaluations, params and optimizer state, bitwise."""
    base, shared = base_run
    data = tmp_path / "chats.jsonl"  # (a copy: changed at the end)
    data.write_text(shared.read_text())
    ref = tmp_path / "ref"
    args = ["--from", str(base), "--data", f"{data}:1", "--steps", "6", "--save-every", "2", "--eval-every", "2"]
    assert main(["sft", *args, "--out", str(ref)]) == 0
    record = json.loads((ref / "data.json").read_text())
    assert record["source"] == "sft" and record["train_conversations"] == 57 and record["val_conversations"] == 3
    before = record["val_loss_before"]
    ev = evals(ref)
    assert [e[0] for e in ev] == [2, 4, 6] and ev[-1][1] < before  # the held-out loss went down
    assert Checkpointer(ref, read_only=True).all_steps()[-1] == 6

    run, marker = tmp_path / "run", tmp_path / "save-held"
    log = open(tmp_path / "child.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "jaxchat.cli", "sft", *args, "--out", str(run)],
                            env=child_env(**{SAVE_DELAY_ENV: "120@4", SAVE_MARKER_ENV: marker}),
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        t0 = time.time()
        while not (marker.exists() and any(r.get("step", 0) >= 5 and "loss" in r for r in records(run))):
            assert proc.poll() is None, (tmp_path / "child.log").read_text()[-3000:]
            assert time.time() - t0 < 180, "timed out waiting for the held save of step 4 and step 5"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert Checkpointer(run, read_only=True).all_steps() == [2]
    capsys.readouterr()
    assert main(["sft", "--out", str(run), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "at step 2" in out and "removed 1 incomplete checkpoint" in out
    assert curve(run) == curve(ref) and evals(run) == evals(ref)  # bitwise, each step once
    for a, b in zip(_leaves(ref, 6), _leaves(run, 6), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert json.loads((run / "data.json").read_text()) == record

    with open(data, "a") as f:  # the recorded source changed: its rows would differ, so --resume refuses
        f.write(json.dumps({"messages": [{"role": "user", "content": "add 1 and 1"},
                                         {"role": "assistant", "content": "it is 2"}]}) + "\n")
    capsys.readouterr()
    assert main(["sft", "--out", str(run), "--resume"]) == 2
    assert "have changed since" in capsys.readouterr().err
    assert Checkpointer(run, read_only=True).all_steps()[-1] == 6


@pytest.mark.slow
def test_chat_command_on_an_sft_run(base_run, tmp_path, monkeypatch, capsys):
    base, data = base_run
    out = tmp_path / "sft"
    run_sft(str(base), [str(data)], str(out), steps=2, log=lambda *a: None)
    monkeypatch.setattr("sys.stdin", io.StringIO("add 2 and 3\n/clear\nadd 2 and 3\n"))
    status = main(["chat", "--run", str(out), "--temperature", "0", "--max-tokens", "6"])
    text, err = capsys.readouterr()
    assert status == 0, err
    replies = [line.split("assistant> ", 1)[1] for line in text.splitlines() if "assistant> " in line]
    assert len(replies) == 2 and replies[0] == replies[1]  # greedy, and /clear made it the same first turn


def test_sft_refuses_bad_input_with_a_message(tmp_path, capsys):
    base = tmp_path / "base"  # a run's config and tokenizer are all that is read before the data is refused
    base.mkdir()
    cfg = apply_overrides(get_preset("tiny"), json.loads(GOLDEN.read_text())["set"])
    (base / "config.json").write_text(json.dumps(cfg.to_dict()))
    Tokenizer.train([open(m.__file__).read() for m in (os, argparse)], 512).save(base / "tokenizer.json")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "x"}]}\n'
                   '{"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}\n')
    assert main(["sft", "--from", str(base), "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "bad.jsonl line 2: turn 1 is from user" in capsys.readouterr().err
    assert main(["sft", "--out", str(tmp_path / "o")]) == 2
    assert "needs --from RUN and --data" in capsys.readouterr().err
    assert main(["sft", "--from", str(base), "--data", str(bad), "--out", str(base), "--force"]) == 2
    assert "is the pretrained run itself" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and (base / "config.json").exists()


def test_sft_refuses_an_optimizer_its_recipe_does_not_cover():
    """nanochat's SFT recipe rewrites adamw's or muon's settings; a golf-optimizer run gets a message, not a
    ValueError from deep inside the optimizer."""
    from jaxchat.chat.sft import sft_config
    from jaxchat.config import ConfigError
    from jaxchat.presets import get_preset
    with pytest.raises(ConfigError, match="optim.optimizer='golf'"):
        sft_config(get_preset("golf-pr334"), steps=10, eval_every=5, save_every=5)
