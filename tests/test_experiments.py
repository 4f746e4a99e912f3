"""Experiments: what a run records for a table, sweeps (validated first, resumable), reports (against hand-computed
numbers), trackers (files read back), and a token budget for `data prepare`."""

import glob
import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import child_env, records
from jaxchat.cli import main
from jaxchat.overrides import apply_overrides
from jaxchat.experiments.report import collect, markdown, mean_std, tables
from jaxchat.experiments.results import smooth_losses
from jaxchat.experiments.sweep import expand
from jaxchat.optim import lr_at
from jaxchat.presets import get_preset
from jaxchat.rundir import load_run_config

ROOT = Path(__file__).resolve().parents[1]
REF = json.loads((ROOT / "tests" / "golden" / "tiny-micro-20.json").read_text())
MICRO = [s for s in REF["set"] if not s.startswith(("train.num_steps", "train.save_every", "train.eval_every",
                                                    "train.keep"))]


def sets(*extra):
    return [a for s in MICRO + list(extra) for a in ("--set", s)]


# ------------------------------------------------------------------------------------------------------------
# numbers by hand

def test_smooth_loss_is_the_debiased_ema():
    # s = 0.9 s + 0.1 loss; smooth = s / (1 - 0.9^(i+1)): [4, 2, 3] -> 0.4/0.1, 0.56/0.19, 0.804/0.271
    assert smooth_losses([4.0, 2.0, 3.0]) == pytest.approx([4.0, 56 / 19, 804 / 271], rel=1e-12)


def test_mean_std_is_the_cards_population_std():
    m, s = mean_std([3.0745, 3.1355, 3.0765])  # seed card 000: "3.0955 ± 0.028"
    assert m == pytest.approx(3.0955, abs=1e-12) and s == pytest.approx(math.sqrt(0.002402 / 3), rel=1e-9)


def fake_run(d: Path, mlp: str, seed: int, final: float, smooth: float):
    cfg = apply_overrides(get_preset("tiny"), [f"model.mlp={mlp}", f"train.init_seed={seed}",
                                               f"data.data_seed={seed}"])
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(cfg.to_dict()))
    (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": final + 1 / s}) + "\n"
                                             for s in range(1, 5)) + json.dumps({"step": 4, "val_bpb": 2.0,
                                                                                 "val_loss": 3.0}) + "\n")
    (d / "summary.json").write_text(json.dumps({"step": 4, "final_loss": final, "smooth_final_loss": smooth,
                                                "val_loss": 3.0, "val_bpb": 2.0, "tokens": 4096, "wall_s": 10.0,
                                                "train_s": 8.0, "tokens_per_s": 512.0, "model_flops": 1e9}))


def test_report_tables_against_hand_computed_numbers(tmp_path):
    finals = {"gelu": [3.0745, 3.1355, 3.0765], "relu2": [3.20, 3.30, 3.25]}
    for mlp, values in finals.items():
        for seed, v in enumerate(values):
            fake_run(tmp_path / f"{mlp}{seed}", mlp, seed, v, v + 0.01)
    runs, keys = collect(sorted(tmp_path.iterdir()))
    assert keys == ["model.mlp"] and {r["group"] for r in runs} == {"model.mlp=gelu", "model.mlp=relu2"}
    t = tables(runs, "final_loss")
    gelu = next(e for e in t["groups"] if e["group"] == "model.mlp=gelu")
    assert gelu["final_loss"] == pytest.approx(3.0955) and gelu["final_loss_std"] == pytest.approx(0.0282961, abs=1e-7)
    relu = next(e for e in t["groups"] if e["group"] == "model.mlp=relu2")
    assert relu["final_loss"] == pytest.approx(3.25) and relu["final_loss_std"] == pytest.approx(math.sqrt(0.005 / 3))
    assert [e["group"] for e in t["comparison"]] == ["model.mlp=gelu", "model.mlp=relu2"]
    assert t["comparison"][0]["gap_to_best"] == 0 and t["comparison"][1]["gap_to_best"] == pytest.approx(0.1545)
    text = markdown(t)
    assert "| model.mlp=gelu | mean ± std (3) | 3.0955 ± 0.0283 |" in text and "| +0.1545 |" in text
    assert main(["report", *map(str, sorted(tmp_path.iterdir())), "--out", str(tmp_path / "rep")]) == 0
    for name in ("report.md", "seeds.csv", "comparison.csv", "report.json", "loss.png", "val_bpb.png"):
        assert (tmp_path / "rep" / name).stat().st_size > 100, name
    assert (tmp_path / "rep" / "loss.png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------------------------------------
# sweeps

@pytest.mark.parametrize("spec,needle", [
    ({"grid": {"model.no_such_key": ["1"]}}, "is not a config key"),
    ({"grid": {"model.mlp": []}}, "has no values"),
    ({"seeds": [0, 0]}, "repeat a seed"),
    ({"grid": {"model.mlp": ["relu2", "nope"]}}, "the run mlp=nope_seed=0 of this sweep is not a valid config"),
    ({"grid": {"train.init_seed": ["1"]}}, "set by the seeds"),
])
def test_bad_sweep_specs_are_refused_before_any_run(tmp_path, spec, needle, capsys):
    spec_file = tmp_path / "spec.toml"
    lines = [f"seeds = {spec.get('seeds', [0])}"]
    if "grid" in spec:
        lines.append("[grid]")
        lines += [f'"{k}" = {json.dumps(v)}' for k, v in spec["grid"].items()]
    spec_file.write_text("\n".join(lines) + "\n")
    assert main(["sweep", "--out", str(tmp_path / "sw"), "--spec", str(spec_file)]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "sw").exists()


def test_sweep_expands_grid_times_seeds():
    runs = expand({"preset": "tiny", "seeds": [0, 1], "grid": {"model.mlp": ["relu2", "gelu"]}})
    assert [r["name"] for r in runs] == ["mlp=relu2_seed=0", "mlp=relu2_seed=1", "mlp=gelu_seed=0",
                                         "mlp=gelu_seed=1"]
    assert runs[3]["sets"][-3:] == ["model.mlp=gelu", "train.init_seed=1", "data.data_seed=1"]


@pytest.mark.slow
def test_a_killed_sweep_resumes_without_rerunning_finished_runs(tmp_path):
    out = tmp_path / "sw"
    argv = [sys.executable, "-m", "jaxchat.cli", "sweep", "--out", str(out), "--preset", "tiny", "--seeds", "0,1",
            "--grid", "model.mlp=relu2"] + sets("train.num_steps=40", "train.save_every=4", "train.eval_every=0")
    p = subprocess.Popen(argv, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    first, second = out / "runs" / "mlp=relu2_seed=0", out / "runs" / "mlp=relu2_seed=1"
    deadline = time.time() + 300
    while not (second / "checkpoints" / "4").is_dir():
        assert time.time() < deadline and p.poll() is None, p.stdout.read() if p.poll() is not None else "timeout"
        time.sleep(0.1)
    os.killpg(p.pid, signal.SIGKILL)  # the sweep and its child run
    p.wait(60)
    done = (first / "summary.json").stat().st_mtime_ns
    assert not (second / "summary.json").exists()
    again = subprocess.run(argv, env=child_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "mlp=relu2_seed=0: finished, kept" in again.stdout and "mlp=relu2_seed=1: resuming" in again.stdout
    assert "| model.mlp=relu2 | mean ± std (2) |" in again.stdout and (out / "report" / "seeds.csv").is_file()
    assert (first / "summary.json").stat().st_mtime_ns == done  # not re-run
    assert json.loads((second / "summary.json").read_text())["restarts"] == 1
    assert [r["step"] for r in records(second) if "loss" in r] == list(range(1, 41))


# ------------------------------------------------------------------------------------------------------------
# a run's own records, and the trackers

def read_wandb(path: Path) -> list[dict]:
    """The history rows of a W&B run file (LevelDB log format: 7-byte file header, 32 KiB blocks, records of
    crc32 u32, length u16, type u8; types 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw, pos, chunks, rows = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(raw):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if n == 0 and kind == 0:
            pos += left
            continue
        chunks += raw[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(chunks)
            chunks = b""
            if rec.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return rows


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    run = tmp_path_factory.mktemp("tracked") / "run"
    env = child_env(WANDB_MODE="offline", WANDB_SILENT="true")
    p = subprocess.run([sys.executable, "-m", "jaxchat.cli", "train", "--preset", "tiny", "--run-dir", str(run)]
                       + sets("train.num_steps=12", "train.eval_every=6", "train.trackers=tensorboard,wandb",
                              "train.run_name=exp1"), env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return run


def test_run_records_what_a_table_needs(tracked):
    summary = json.loads((tracked / "summary.json").read_text())
    steps = [r for r in records(tracked) if "loss" in r]
    assert summary["final_loss"] == steps[-1]["loss"]
    assert summary["smooth_final_loss"] == pytest.approx(smooth_losses([r["loss"] for r in steps])[-1], rel=1e-12)
    cfg = load_run_config(tracked)
    assert summary["tokens"] == 12 * cfg.train.batch_size * cfg.model.sequence_len
    assert summary["train_s"] > 0 and summary["tokens_per_s"] == pytest.approx(summary["tokens"] / summary["train_s"],
                                                                                rel=0.01)
    assert [r["lr"] for r in steps] == [lr_at(cfg, s - 1) for s in range(1, 13)]  # every step's learning rate
    assert len({r["lr"] for r in steps}) > 5  # (warmup, then cosine: the records are not a constant)
    env = json.loads((tracked / "environment.json").read_text())
    assert env["jax"] and env["devices"] >= 1 and env["processes"] == 1 and env["backend"] == "cpu"


def test_tensorboard_event_file_holds_the_metrics(tracked):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    seen = {}
    for f in glob.glob(str(tracked / "tensorboard" / "*")):
        for ev in EventFileLoader(f).Load():
            for v in ev.summary.value:
                seen.setdefault(v.tag, {})[ev.step] = float(tensor_util.make_ndarray(v.tensor))
    steps = [r for r in records(tracked) if "loss" in r]
    evals = [r for r in records(tracked) if "val_loss" in r]
    assert seen["train/loss"] == pytest.approx({r["step"]: r["loss"] for r in steps}, rel=1e-6)
    assert seen["val/bpb"] == pytest.approx({r["step"]: r["val_bpb"] for r in evals}, rel=1e-6)
    assert sorted(seen["val/bpb"]) == [6, 12]


def test_wandb_offline_run_holds_the_metrics(tracked):
    files = glob.glob(str(tracked / "wandb" / "offline-run-*" / "*.wandb"))
    assert len(files) == 1
    rows = read_wandb(Path(files[0]))
    losses = {r["_step"]: r["train/loss"] for r in rows if "train/loss" in r}
    assert losses == pytest.approx({r["step"]: r["loss"] for r in records(tracked) if "loss" in r}, rel=1e-9)
    assert json.loads((tracked / "trackers.json").read_text())["wandb_id"] in files[0]


def test_a_missing_tracker_package_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: `import wandb` raises ImportError
    assert main(["train", "--run-dir", str(tmp_path / "r"), "--preset", "tiny"] + sets("train.trackers=wandb")) == 2
    err = capsys.readouterr().err
    assert "pip install 'jaxchat[trackers]'" in err and not (tmp_path / "r").exists()
    assert main(["train", "--run-dir", str(tmp_path / "r"), "--preset", "tiny"] + sets("train.trackers=neptune")) == 2
    assert "unknown tracker(s) ['neptune']" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------
# a token budget for data prepare

def test_data_prepare_stops_at_a_token_budget(tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(60):
        (docs / f"{i:02d}.txt").write_text(f"document number {i} " * (5 + i % 7))
    assert main(["tokenizer", "train", str(docs), "--vocab", "300", "--out", str(tmp_path / "tok.json")]) == 0
    base = ["data", "prepare", str(docs), "--tokenizer", str(tmp_path / "tok.json"), "--val-docs", "5",
            "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "all")]) == 0
    assert main(base + ["--out", str(tmp_path / "cut"), "--max-tokens", "500"]) == 0
    full = json.loads((tmp_path / "all" / "manifest.json").read_text())
    cut = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    assert full["train"]["tokens"] > 1000 and cut["params"]["max_tokens"] == 500
    shard = np.fromfile(next((tmp_path / "cut" / "tokens").glob("train_*.bin")), np.uint16, offset=1024)
    assert shard.size == cut["train"]["tokens"]
    bos = cut["params"]["bos_id"]
    ends = np.flatnonzero(shard == bos)  # documents start with BOS: the cut falls on a boundary past 500
    assert cut["train"]["tokens"] >= 500 and ends[-1] < 500
    assert cut["val"] == full["val"]  # the validation split is whole


# ------------------------------------------------------------------------------------------------------------
# reproducing a card: its budget fraction, its tokenizer's BOS

def test_a_card_at_a_fraction_of_its_budget():
    runs = expand({"preset": "d12-gelu-chinchilla", "seeds": [0, 1, 2], "budget": 0.01})
    assert [r["name"] for r in runs] == ["seed=0", "seed=1", "seed=2"]
    assert runs[0]["sets"][:2] == ["train.num_steps=199", "optim.warmup_steps=5"]  # 19,920 and 500 steps x 0.01


def test_a_sentencepiece_style_tokenizer_delimits_documents_with_its_bos(tmp_path):
    """The seed cards' tokenizer (Mistral-7B) has <s>, not <|bos|>: a Metaspace + byte-fallback BPE of that
    kind, built here, delimits documents with <s>."""
    from tokenizers import Tokenizer as HF, models, pre_tokenizers, decoders

    from jaxchat.data import Tokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}, "▁": 259, "a": 260}
    hf = HF(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Metaspace()
    hf.add_special_tokens(["<unk>", "<s>", "</s>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.load(tmp_path / "tokenizer.json")
    assert tok.bos_id == 1 and tok.decode(tok.encode("a a")) == "a a"
