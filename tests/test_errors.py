"""Errors people meet: each is one paragraph naming the value and the fix, and none destroys a checkpoint or a run
directory. Also the non-finite guard through the loop, and `train --dry-run`.

Most cases use a run directory made without training (config.json + checkpoints of a zero state), so they cost
no compile; the few that train share compiled programs through the session's persistent XLA cache (conftest.py).
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchat.checkpoint import Checkpointer
from jaxchat.cli import main
from jaxchat.config import ConfigError
from jaxchat.overrides import apply_overrides
from jaxchat.fileio import read_jsonl
from jaxchat.plan import resolve
from jaxchat.presets import get_preset
from jaxchat.rundir import mark_run_dir
from jaxchat.optim import build_optimizer
from jaxchat.train import ModelFns, abstract_state, check_batch_fits

ROOT = Path(__file__).resolve().parents[1]
REF = json.loads((ROOT / "tests" / "golden" / "tiny-micro-20.json").read_text())


def sets(*extra):
    out = []
    for s in list(REF["set"]) + list(extra):
        out += ["--set", s]
    return out


def train(run_dir, *extra, preset=True, flags=()):
    return main(["train", "--run-dir", str(run_dir)] + (["--preset", "tiny"] if preset else []) + list(flags)
                + (sets(*extra) if preset else [a for s in extra for a in ("--set", s)]))


def snapshot(path: Path) -> dict:
    """Every file under `path` and a hash of its bytes."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(path).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ref_cfg():
    return resolve(apply_overrides(get_preset("tiny"), REF["set"]), 1)


@pytest.fixture(scope="module")
def fake_run_template(tmp_path_factory, ref_cfg):
    run = tmp_path_factory.mktemp("template") / "run"
    run.mkdir()
    mark_run_dir(run, "test")
    (run / "config.json").write_text(json.dumps(ref_cfg.to_dict()))
    fns = ModelFns(ref_cfg)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract_state(fns, build_optimizer(ref_cfg, None)))
    ck = Checkpointer(run)
    for step in (4, 8):
        ck.save(step, {**zeros, "step": jnp.int32(step)}, {"config": ref_cfg.to_dict(), "saved_at": 0.0})
    ck.close()
    return run


@pytest.fixture
def fake_run(tmp_path, fake_run_template):
    """A run directory with config.json and committed checkpoints 4 and 8 of a zero state (no training)."""
    shutil.copytree(fake_run_template, tmp_path / "run")
    return tmp_path / "run"


def one_paragraph(err: str) -> str:
    msg = err.strip()
    assert msg.startswith("jaxchat train: error:") or msg.startswith("jaxchat eval: error:"), msg
    assert "Traceback" not in msg and len(msg) < 1500, msg
    return msg


# ------------------------------------------------------------------------------------------------------------
# missing and corrupt checkpoints

def test_resume_without_a_run(tmp_path, capsys):
    assert train(tmp_path / "nothing", flags=["--resume"], preset=False) == 2
    msg = one_paragraph(capsys.readouterr().err)
    assert "nothing/config.json does not exist" in msg and "without --resume" in msg
    assert not (tmp_path / "nothing").exists()


def test_resume_before_the_first_save_committed_trains_from_step_0(fake_run, capsys):
    """A run killed during its first save (marker, config.json, a temporary step directory; no tokenizer.json,
    data.json or committed step): --resume trains it from step 0 with its recorded config, writes what it lacked,
    and counts the restart."""
    ckpts = fake_run / "checkpoints"
    for step in (4, 8):
        (ckpts / str(step)).rename(ckpts / f"{step}.orbax-checkpoint-tmp-1")
    (fake_run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 9.9, "time": 12.0, "proc": 10.0}) + "\n")
    assert train(fake_run, flags=["--resume"], preset=False) == 0
    out = capsys.readouterr().out
    assert "from step 0 with its recorded config.json: it has no committed checkpoint" in out
    assert "removed 2 incomplete checkpoint(s)" in out
    assert not list(ckpts.glob("*tmp*")) and (fake_run / "tokenizer.json").is_file()
    losses = [r["loss"] for r in read_jsonl(fake_run / "metrics.jsonl")[0] if "loss" in r]
    np.testing.assert_allclose(losses, REF["losses"], rtol=1e-4)  # the recorded config's run (exact: test_resume)
    summary = json.loads((fake_run / "summary.json").read_text())
    assert (summary["restarts"], summary["lost_steps"], summary["time_s"]["restarts"]) == (1, 1, 2.0)


def test_eval_of_a_run_without_checkpoints(tmp_path, ref_cfg, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(ref_cfg.to_dict()))
    assert main(["eval", "--run", str(run)]) == 2
    msg = one_paragraph(capsys.readouterr().err)
    assert "no checkpoint" in msg and "jaxchat train --run-dir" in msg
    assert not (run / "checkpoints").exists()


def _biggest_file(d: Path) -> Path:
    return max((p for p in d.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["flipped bytes", "truncated", "meta garbled"])
def test_corrupt_checkpoint(fake_run, damage, capsys):
    step_dir = fake_run / "checkpoints" / "8"
    if damage == "meta garbled":
        (step_dir / "meta" / "metadata").write_text("{not json")
    else:
        p = _biggest_file(step_dir / "state")
        data = bytearray(p.read_bytes())
        if damage == "truncated":
            data = data[: len(data) // 3]
        else:
            for i in range(64, len(data), 101):
                data[i] ^= 0xFF
        p.write_bytes(bytes(data))
    before = snapshot(fake_run)
    assert train(fake_run, flags=["--resume"], preset=False) == 2
    msg = one_paragraph(capsys.readouterr().err)
    assert "checkpoint step 8" in msg and str(step_dir) in msg and "resume again from step 4" in msg
    assert "Nothing was deleted" in msg
    assert snapshot(fake_run) == before


# ------------------------------------------------------------------------------------------------------------
# run directories

def test_existing_run_needs_resume_or_force(fake_run, capsys):
    before = snapshot(fake_run)
    assert train(fake_run) == 2
    msg = one_paragraph(capsys.readouterr().err)
    assert str(fake_run) in msg and "already exists" in msg and "--resume" in msg and "--force" in msg
    assert train(fake_run, flags=["--resume", "--force"]) == 2
    assert "contradict" in one_paragraph(capsys.readouterr().err)
    assert snapshot(fake_run) == before


def test_run_in_use_by_another_process(fake_run, capsys):
    from jaxchat.rundir import lock_run_dir

    fd = lock_run_dir(fake_run)  # as a live `jaxchat train` on this run holds it
    try:
        before = snapshot(fake_run)
        assert train(fake_run, flags=["--resume"], preset=False) == 2
        msg = one_paragraph(capsys.readouterr().err)
        assert "another process is using run directory" in msg and str(fake_run) in msg
        assert train(fake_run, flags=["--force"]) == 2  # --force does not delete a run being trained
        assert "another process" in capsys.readouterr().err
        assert snapshot(fake_run) == before
    finally:
        os.close(fd)


def test_force_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "thesis.tex").write_text("years of work")
    assert train(tmp_path, flags=["--force"]) == 2
    msg = one_paragraph(capsys.readouterr().err)
    assert "not a jaxchat run" in msg and "refusing" in msg
    assert (tmp_path / "thesis.tex").read_text() == "years of work"


@pytest.mark.parametrize("extra,flags,needle", [
    ((), ["--keep-last", "1"], "train.keep_last=1 must be an integer >= 2"),
    ((), ["--keep-every", "6"], "train.keep_every=6 must be a multiple of train.save_every=4, so every permanent "
                                "checkpoint falls on a saved step: use 4 or 8"),
    (("train.save_every=0",), ["--keep-every", "8"], "train.save_every=0 saves only the final step"),
])
def test_retention_settings_are_checked(tmp_path, extra, flags, needle, capsys):
    assert train(tmp_path / "r", *extra, flags=flags) == 2
    assert needle in one_paragraph(capsys.readouterr().err)
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------------------------
# configs that do not fit the checkpoint

def test_resume_with_another_model(fake_run, capsys):
    before = snapshot(fake_run)
    assert train(fake_run, "model.n_embd=128", flags=["--resume"]) == 2
    msg = one_paragraph(capsys.readouterr().err)
    assert "model.n_embd" in msg and "64" in msg and "128" in msg and "omit --preset" in msg
    assert snapshot(fake_run) == before


def test_resume_with_another_batch_size(fake_run, capsys):
    before = snapshot(fake_run)
    assert train(fake_run, "train.batch_size=8", flags=["--resume"], preset=False) == 2
    msg = one_paragraph(capsys.readouterr().err)
    assert "train.batch_size" in msg and "4" in msg and "8" in msg
    assert snapshot(fake_run) == before


def test_config_json_edited_after_the_checkpoint(fake_run, capsys):
    """config.json says one model, the checkpoint holds another: caught from the checkpoint's own config."""
    cfg = json.loads((fake_run / "config.json").read_text())
    cfg["model"]["n_layer"] = 3
    (fake_run / "config.json").write_text(json.dumps(cfg))
    before = snapshot(fake_run)
    assert train(fake_run, flags=["--resume"], preset=False) == 2
    msg = one_paragraph(capsys.readouterr().err)
    assert "model.n_layer: checkpoint has 2, now 3" in msg
    assert snapshot(fake_run) == before


# ------------------------------------------------------------------------------------------------------------
# data and tokenizer

def test_tokenizer_path_that_does_not_exist(tmp_path, fake_run, capsys):
    missing = tmp_path / "nowhere" / "tokenizer.json"
    assert train(tmp_path / "new", f"data.tokenizer_path={missing}") == 2
    msg = one_paragraph(capsys.readouterr().err)
    assert str(missing) in msg and "does not exist" in msg and "data.tokenizer_path=''" in msg
    assert not (tmp_path / "new").exists()
    before = snapshot(fake_run)  # --force with a bad data path must not delete the old run first
    assert train(fake_run, f"data.tokenizer_path={missing}", flags=["--force"]) == 2
    assert snapshot(fake_run) == before


def test_tokenizer_larger_than_the_model_vocab(tmp_path, capsys):
    from jaxchat.data import Tokenizer

    tok = Tokenizer.train([Path(json.__file__).read_text(), Path(hashlib.__file__).read_text()], 300)
    tok.save(tmp_path / "tokenizer.json")
    assert train(tmp_path / "new", f"data.tokenizer_path={tmp_path / 'tokenizer.json'}", "model.vocab_size=280") == 2
    msg = one_paragraph(capsys.readouterr().err)
    assert "300 tokens" in msg and "model.vocab_size=280" in msg and "--set model.vocab_size=300" in msg
    assert not (tmp_path / "new").exists()


def test_batch_that_does_not_divide_over_devices(ref_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"does not divide over 8 devices: make batch_size / grad_accum a multiple"):
        check_batch_fits(ref_cfg, 8)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT / "src"))
    cmd = [sys.executable, "-m", "jaxchat.cli", "train", "--preset", "tiny", "--run-dir", str(tmp_path / "r")] + sets()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    msg = one_paragraph(out.stderr[out.stderr.index("jaxchat train: error:"):])
    assert "micro-batch of 2 sequences" in msg and "8 devices" in msg
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------------------------
# the non-finite guard, through the loop

def poisoned(steps):
    """get_batch whose batches at `steps` hold a token id outside the vocabulary: its embedding is NaN."""
    import jaxchat.loop as loop

    real = loop.get_batch

    def get_batch(rows, step, bs, seed, **kw):
        x, y = real(rows, step, bs, seed, **kw)
        if step in steps:
            x = x.copy()
            x[0, 0] = 10**6
        return x, y
    return get_batch


def test_nonfinite_halt_stops_with_the_step_and_saves_nothing_corrupt(tmp_path, monkeypatch, capsys):
    import jaxchat.loop as loop

    monkeypatch.setattr(loop, "get_batch", poisoned({5}))  # the batch of step 6
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train(run, "train.sample_tokens=0")
    assert e.value.code == 3
    err = capsys.readouterr().err
    assert "halted: step 6: loss nan" in err and "train.nonfinite=skip" in err
    recs = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6] and np.isnan(recs[-1]["loss"])
    ck = Checkpointer(run, read_only=True)
    assert ck.all_steps() == [4]
    cfg = resolve(apply_overrides(get_preset("tiny"), REF["set"]), 1)
    fns = ModelFns(cfg)
    state, _ = ck.restore(abstract_state(fns, build_optimizer(cfg, None)))
    leaves = [np.asarray(x) for x in jax.tree.leaves(state)]
    assert all(np.isfinite(x).all() for x in leaves if x.dtype.kind == "f") and int(state["step"]) == 4


def test_nonfinite_skip_counts_skipped_steps(tmp_path, monkeypatch, capsys):
    import jaxchat.loop as loop

    monkeypatch.setattr(loop, "get_batch", poisoned({5, 6}))  # the batches of steps 6 and 7
    run = tmp_path / "run"
    assert train(run, "train.nonfinite=skip", "train.sample_tokens=0") == 0
    assert "non-finite loss or gradient; update skipped (2 skipped so far)" in capsys.readouterr().out
    recs = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["skipped"] for r in recs] == [0] * 5 + [1] + [2] * 14
    assert [np.isnan(r["loss"]) for r in recs] == [False] * 5 + [True, True] + [False] * 13
    assert json.loads((run / "summary.json").read_text())["skipped_steps"] == 2


# ------------------------------------------------------------------------------------------------------------
# --dry-run

def test_dry_run_compiles_from_shapes_and_finds_the_largest_batch(tmp_path, capsys):
    """`train --dry-run` on the micro config against a pretend 5 MiB device: exact parameter and optimizer bytes,
    a peak memory above them, the largest device batch with its bracket closed (it fits, one more does not), no
    run directory, and no parameter array ever made."""
    from jaxchat.dryrun import dry_run, parse_bytes

    cfg = apply_overrides(get_preset("tiny"), REF["set"])
    live = {id(a) for a in jax.live_arrays()}
    out = dry_run(cfg, memory_limit=parse_bytes("5MiB"), log=print)
    new = [a for a in jax.live_arrays() if id(a) not in live]
    assert sum(a.nbytes for a in new) < 1024  # no params, no moments (at most a few scalars)
    r = resolve(cfg, 1)
    n_params = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(
        abstract_state(ModelFns(r), build_optimizer(r, None))["params"]))
    assert out["param_bytes"] == 4 * n_params and out["optimizer_bytes"] >= 2 * out["param_bytes"]
    assert out["peak_bytes"] > out["param_bytes"] + out["optimizer_bytes"] and out["device_batch"] == 2
    best, probes = out["largest_device_batch"], out["probes"]
    assert best >= 1 and probes[best] <= parse_bytes("5MiB") < probes[best + 1] and probes[1] < probes[2]
    text = capsys.readouterr().out
    assert "no parameters allocated" in text and "peak memory" in text and f"fits: {best} sequence" in text
    assert main(["train", "--preset", "tiny", "--run-dir", str(tmp_path / "r"), "--dry-run", "--memory-limit",
                 "1MiB"] + sets()) == 0  # the CLI path: nothing fits, and it says so
    assert "none fits" in capsys.readouterr().out and not (tmp_path / "r").exists()


def test_largest_fitting_closes_the_bracket():
    """The search on synthetic memory curves: affine ones in at most 4 probes, always a valid bracket."""
    from jaxchat.dryrun import largest_fitting

    rng = np.random.default_rng(0)
    for _ in range(300):
        a, b, c = rng.uniform(0, 1e9), rng.uniform(1e3, 1e8), rng.choice([0.0, rng.uniform(0, 1e4)])
        f = lambda d: a + b * d + c * d * d  # noqa: E731
        limit, start = rng.uniform(0, 5e10), int(rng.choice([1, 2, 8, 32, 100, 4096]))
        lo, hi, peaks = largest_fitting(f, limit, start)
        true = max([d for d in range(1, 4097) if f(d) <= limit], default=0)
        assert lo <= true and (hi is None or hi > true)
        assert all(1 <= d <= 4096 for d in peaks) and (lo == 0 or lo in peaks) and (hi is None or hi in peaks)
        if c == 0:
            assert len(peaks) <= 4 and (hi == lo + 1 or (hi is None and lo == 4096)), (start, limit, peaks)


@pytest.mark.slow
def test_dry_run_nanochat_d12_allocates_no_weights():
    """nanochat-d12 (286M params, 1.1 GB of fp32 weights, 3.1 GB with Muon/AdamW state) on this CPU: the dry
    run's peak resident memory stays below the weights it would need."""
    code = ("import resource, sys, jax; from jaxchat.cli import main; "
            "rc = main(['train', '--preset', 'nanochat-d12', '--dry-run']); "
            "print('live_bytes', sum(a.nbytes for a in jax.live_arrays())); "
            "print('maxrss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3000,
                         env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT / "src")))
    assert out.returncode == 0, out.stderr[-3000:]
    maxrss = int(out.stdout.split("maxrss_kb")[1].split()[0]) * 1024
    live = int(out.stdout.split("live_bytes")[1].split()[0])
    assert "parameters" in out.stdout and "1.07 GiB" in out.stdout and "largest device batch" in out.stdout
    assert live < 1_000_000, out.stdout  # no weight or moment array exists
    # weights + optimizer state are 3.1 GB; compiling the probes costs about 1.5 GB of host memory
    assert maxrss < 2_900_000_000, out.stdout
