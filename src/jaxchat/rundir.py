"""Run directories: what a run writes, the rules that keep a run (or anything else) from being destroyed by
accident, and the metrics a resumed run must reconcile.

A run directory holds:
    .jaxchat-run            the marker: written first (atomically) when jaxchat creates a run; only a directory
                            with it is ever cleared by --force, and then only of the names below
    config.json             the full, resolved Config of the run (written right after the marker)
    tokenizer.json          the tokenizer the run trained with
    data.json               what the data pipeline built
    metrics.jsonl           one JSON object per logged step / evaluation, each step once
    metrics.discarded.jsonl records a killed process logged after its last checkpoint (moved here on resume)
    restarts.jsonl          one record per resume: debris removed, steps and seconds lost
    summary.json            the final numbers and the wall-time split
    environment.json        what ran it: jaxchat version and commit, jax/flax/optax versions, devices, processes
    tensorboard/, wandb/, trackers.json   the trackers' files (trackers.py), when asked for
    import.json             what `jaxchat import` mapped (imported runs)
    checkpoints/N/          Orbax checkpoint of step N (checkpoint.py)
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from pathlib import Path

from jaxchat.checkpoint import CheckpointError
from jaxchat.config import Config, ConfigError
from jaxchat.fileio import append_jsonl, read_jsonl, write_json_atomic, write_jsonl_atomic

MARKER = ".jaxchat-run"
# Every name jaxchat writes at the top of a run directory (and their atomic-write temporaries, NAME.tmpPID):
# --force deletes these and nothing else.
OWNED = (MARKER, "config.json", "tokenizer.json", "tokenizer.model", "data.json", "metrics.jsonl", "metrics.discarded.jsonl",
         "restarts.jsonl", "summary.json", "import.json", "environment.json", "trackers.json", "checkpoints",
         "tensorboard", "wandb", "evals")


def is_marked(run_dir: Path) -> bool:
    return (Path(run_dir) / MARKER).is_file()


def mark_run_dir(run_dir: Path, created_by: str) -> None:
    """Write the marker that makes `run_dir` a jaxchat run (atomically: it exists whole or not at all)."""
    write_json_atomic(Path(run_dir) / MARKER, {"jaxchat_run": 1, "created_by": created_by,
                                               "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def _owned(name: str) -> bool:
    return name in OWNED or any(name.startswith(o + ".tmp") for o in OWNED)


def remove_stale_temporaries(run_dir: Path) -> list[str]:
    """Delete the temporaries of atomic writes a killed process left (NAME.tmpPID of a name jaxchat writes);
    returns their names. Call only while holding the run's lock (a live writer's temporary looks the same)."""
    stale = [p for p in Path(run_dir).iterdir() if _owned(p.name) and p.name not in OWNED and p.is_file()]
    for p in stale:
        p.unlink()
    return sorted(p.name for p in stale)


def clear_run_dir(run_dir: Path) -> list[str]:
    """Delete what jaxchat wrote in a marked run directory (the marker last, so a kill midway leaves it a run);
    returns the names of the entries it kept (files jaxchat did not write)."""
    run_dir = Path(run_dir)
    if not is_marked(run_dir):
        raise CheckpointError(f"{run_dir} has no {MARKER} marker, so jaxchat did not create it: refusing to "
                              f"delete anything there")
    kept = []
    for p in sorted(run_dir.iterdir(), key=lambda p: p.name == MARKER):
        if not _owned(p.name):
            kept.append(p.name)
        elif p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    return kept


def load_run_config(run_dir: str | Path) -> Config:
    run_dir = Path(run_dir)
    path = run_dir / "config.json"
    if not path.is_file() and is_marked(run_dir):
        raise CheckpointError(f"{run_dir} was created by jaxchat ({MARKER}) but stopped before writing its "
                              f"config.json: start it again with the same command and --force instead of --resume "
                              f"(nothing else is there to read)")
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


def check_run_dir(run_dir: Path, resume: bool, force: bool, flag: str = "--run-dir") -> None:
    """Never destroys a run, or anything else, by accident: an existing run needs --resume (continue it with its
    recorded config) or --force (clear jaxchat's files and start over); a directory jaxchat did not mark is never
    cleared. Only looks; `start_run_dir` acts later, once every other check has passed."""
    if not str(run_dir) or str(run_dir) != str(run_dir).strip():
        raise ConfigError(f"--run-dir {str(run_dir)!r} is empty or padded with spaces: pass a directory name, "
                          f"e.g. --run-dir runs/tiny")
    if resume and force:
        raise ConfigError("--resume and --force contradict each other: --resume continues the run in --run-dir, "
                          "--force deletes it and starts over. Pass one.")
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"{flag} {run_dir} is a file, not a directory: choose another {flag}")
    if resume:
        if not (run_dir / "config.json").is_file():
            why = (f"it was created by jaxchat ({MARKER}) but stopped before writing its config.json: start it "
                   f"again with the same command and --force instead of --resume" if is_marked(run_dir)
                   else "start it without --resume")
            raise CheckpointError(f"--resume: {run_dir} holds no run (no config.json); {why}")
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        if not is_marked(run_dir):
            legacy = (f"; if it is a run an older jaxchat made, `jaxchat train --run-dir {run_dir} --resume` "
                      f"adopts it (and marks it)" if (run_dir / "checkpoints").is_dir() else "")
            raise CheckpointError(f"{flag} {run_dir} already exists and is not a jaxchat run (it has no {MARKER} "
                                  f"marker, which jaxchat writes first in every run it creates): refusing to "
                                  f"write or delete anything there. Choose another {flag}{legacy}.")
        if not force:
            resume_hint = "--resume to continue that run with its recorded config, " if flag == "--run-dir" else ""
            raise CheckpointError(f"run directory {run_dir} already exists (a jaxchat run): pass {resume_hint}"
                                  f"--force to delete its jaxchat files and start over with this command's config, "
                                  f"or choose another {flag}")


def start_run_dir(run_dir: Path, force: bool, created_by: str, log=print, flag: str = "--run-dir") -> None:
    """check_run_dir, then clear an old run under --force (only jaxchat's files), create the directory and mark
    it. The caller holds the old run's lock (`lock_run_dir`), so a run another process is training is never
    cleared."""
    check_run_dir(run_dir, resume=False, force=force, flag=flag)
    if run_dir.exists() and any(run_dir.iterdir()):
        kept = clear_run_dir(run_dir)
        log(f"--force: deleted the jaxchat run in {run_dir}"
            + (f"; kept {len(kept)} entr{'y' if len(kept) == 1 else 'ies'} jaxchat did not write: "
               f"{', '.join(kept[:5])}{' ...' if len(kept) > 5 else ''}" if kept else ""))
    run_dir.mkdir(parents=True, exist_ok=True)
    mark_run_dir(run_dir, created_by)


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
