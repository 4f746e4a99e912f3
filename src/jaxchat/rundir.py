"""Run directories: what a run writes, the rules that keep a run from being destroyed by accident, and the
metrics a resumed run must reconcile.

A run directory holds:
    config.json             the full, resolved Config of the run
    tokenizer.json          the tokenizer the run trained with
    data.json               what the data pipeline built
    metrics.jsonl           one JSON object per logged step / evaluation, each step once
    metrics.discarded.jsonl records a killed process logged after its last checkpoint (moved here on resume)
    restarts.jsonl          one record per resume: debris removed, steps and seconds lost
    summary.json            the final numbers and the wall-time split
    checkpoints/N/          Orbax checkpoint of step N (checkpoint.py)
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

from jaxchat.checkpoint import CheckpointError
from jaxchat.config import Config, ConfigError
from jaxchat.fileio import append_jsonl, read_jsonl, write_jsonl_atomic


def load_run_config(run_dir: str | Path) -> Config:
    run_dir = Path(run_dir)
    path = run_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a jaxchat run directory: {path} does not exist. Pass the "
                              f"directory of an existing run (one `jaxchat train` wrote, e.g. runs/tiny), or start a "
                              f"new run there with `jaxchat train` without --resume.")
    try:
        return Config.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} is not a valid jaxchat config ({e}); restore it from the run's "
                              f"checkpoints/*/meta/metadata (its 'config' entry) or re-create the run.") from None


def lock_run_dir(run_dir: Path) -> int:
    """Take an exclusive advisory lock on the run directory for this process's lifetime (the kernel releases it
    when the process dies, even by SIGKILL). Returns the file descriptor to keep open."""
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CheckpointError(f"another process is using run directory {run_dir} (it holds the run's lock): "
                              f"wait for that `jaxchat train` to finish or stop it, then retry. Nothing was "
                              f"changed.") from None
    return fd


def check_run_dir(run_dir: Path, resume: bool, force: bool) -> None:
    """Never destroys a run by accident: an existing run needs --resume (continue) or --force (start over).
    Only looks; `run_training` acts later, once every other check has passed."""
    if resume and force:
        raise ConfigError("--resume and --force contradict each other: --resume continues the run in --run-dir, "
                          "--force deletes it and starts over. Pass one.")
    if resume:
        if not (run_dir / "config.json").is_file():
            raise CheckpointError(f"--resume: {run_dir} holds no run (no config.json); start it without --resume")
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"--run-dir {run_dir} is a file, not a directory: choose another --run-dir")
    if run_dir.exists() and any(run_dir.iterdir()):
        if not force:
            raise CheckpointError(f"run directory {run_dir} already exists: pass --resume to continue that run, "
                                  f"--force to delete it and start over, or choose another --run-dir")
        if not (run_dir / "config.json").is_file():
            raise CheckpointError(f"--force: {run_dir} is not empty and is not a jaxchat run (no config.json); "
                                  f"refusing to delete it. Choose another --run-dir.")


def prepare_run_dir(run_dir: Path, resume: bool, force: bool) -> None:
    """check_run_dir, then (without --resume) delete an old run under --force and create the directory. The
    caller holds the old run's lock (`lock_run_dir`), so a run another process is training is never deleted."""
    check_run_dir(run_dir, resume, force)
    if not resume:
        if run_dir.exists() and any(run_dir.iterdir()):
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)


def reconcile_metrics(run_dir: Path, step: int, meta: dict, write: bool = True) -> dict:
    """Make metrics.jsonl hold exactly the records of steps <= `step` (the checkpoint being resumed), each
    (kind, step) once: a killed process may have logged steps after its last checkpoint (they will be
    recomputed) and may have died mid-line. Dropped records are appended to metrics.discarded.jsonl.

    Returns what was done and the progress lost: `lost_s` sums, over each process that logged after the
    checkpoint, the time from the checkpoint's save (for the process that wrote it) or from the process's start
    (for a later one that died before its own first save) to its last record. With write=False it only
    reports (what the other processes of a multi-process run do)."""
    path = run_dir / "metrics.jsonl"
    records, bad = read_jsonl(path)
    keep, dropped, seen, dupes = [], [], set(), 0
    for r in records:
        key = ("loss" in r, "val_loss" in r, r.get("step"))
        if r.get("step", 0) > step:
            dropped.append(r)
        elif key in seen:
            dupes += 1
        else:
            seen.add(key)
            keep.append(r)
    lost_s, by_proc = 0.0, {}
    for r in dropped:
        if "time" in r:
            by_proc.setdefault(r.get("proc"), []).append(r["time"])
    for proc, times in by_proc.items():
        start = meta.get("saved_at") if proc == meta.get("proc") else proc
        if start is not None:
            lost_s += max(0.0, max(times) - float(start))
    lost_steps = sorted({r["step"] for r in dropped if "loss" in r})
    if write and (dropped or bad or dupes):
        if dropped:
            append_jsonl(run_dir / "metrics.discarded.jsonl", dropped)
        write_jsonl_atomic(path, keep)
    return {"dropped": len(dropped), "lost_steps": lost_steps, "lost_s": lost_s, "unreadable_lines": bad,
            "duplicates": dupes}
