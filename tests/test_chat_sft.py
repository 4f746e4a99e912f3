"""`jaxchat sft`: the recipe as config changes, the data order, and exact resume on the tiny-micro model."""

import argparse
import io
import json
import os
import random
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxchat.chat.sft import batch_indices, run_sft, sft_config, split
from jaxchat.cli import main
from jaxchat.config import ConfigError
from jaxchat.overrides import apply_overrides
from jaxchat.data.tokenizer import Tokenizer
from jaxchat.loop import run_training
from jaxchat.run import load_run
from jaxchat.presets import get_preset

GOLDEN = Path(__file__).parent / "golden" / "tiny-micro-20.json"


def test_recipe_scales_every_lr_and_drops_decay():
    base = get_preset("nanochat-d12")
    groups = json.loads(sft_config(base, 10, 0, 0).optim.groups)
    assert groups["muon"] == {"lr": pytest.approx(0.016), "wd": 0.0}
    assert groups["wte"] == {"lr": pytest.approx(0.24), "wd": 0.0}
    assert (groups["warmup_steps"], groups["warmdown_ratio"], groups["final_lr_frac"]) == (0, 0.5, 0.0)
    adamw = sft_config(get_preset("tiny"), 10, 0, 0).optim
    assert adamw.lr == pytest.approx(0.8 * get_preset("tiny").optim.lr) and adamw.weight_decay == 0


def test_batches_are_a_pure_function_of_the_step():
    a = [batch_indices(10, s, 4, seed=0) for s in range(5)]
    assert all(np.array_equal(x, batch_indices(10, s, 4, seed=0)) for s, x in enumerate(a))
    first_epoch = np.concatenate(a)[:10]
    assert sorted(first_epoch.tolist()) == list(range(10))  # each row once per epoch
    assert not np.array_equal(a[0], batch_indices(10, 0, 4, seed=1))


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


@pytest.mark.slow
def test_sft_trains_and_resumes_exactly(base_run, tmp_path):
    base, data = base_run
    out = tmp_path / "sft"
    first = run_sft(str(base), [str(data)], str(out), steps=4, save_every=2, log=lambda *a: None)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert first["val_loss"] < records[0]["val_loss"]  # held-out loss went down
    _, _, params, _, step = load_run(out)
    record = json.loads((out / "sft.json").read_text())
    assert step == 4 and record["train_conversations"] == 57 and record["val_conversations"] == 3
    shutil.rmtree(out / "checkpoints" / "4")  # as if killed after the step-2 checkpoint
    assert main(["sft", "--out", str(out), "--resume"]) == 0
    _, _, resumed, _, step = load_run(out)
    assert step == 4
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(resumed)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    again = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in again if "loss" in r] == losses  # records neither lost nor repeated



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
