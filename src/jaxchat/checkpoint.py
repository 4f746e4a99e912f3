"""Orbax checkpoints of the full training state, and what an interrupted save leaves behind.

A run directory (rundir.py) holds `checkpoints/N/` for each saved step N: the Orbax checkpoint of `state`
(params, optimizer state, step, skipped counter) and `meta` (JSON: config, cumulative wall-time split, save time,
process id).

Atomicity (Orbax's protocol, which we rely on rather than re-implement): each step is written into
`checkpoints/N.orbax-checkpoint-tmp*` and renamed to `checkpoints/N` only once every file is written, so a
reader (and `latest_step`) never sees a partial step. A process killed mid-save leaves that temporary
directory behind; `remove_debris` deletes it on the next start and says so. Saves are asynchronous (training
continues while a step is written; the next save or `close()` waits for it). Retention keeps the last
`keep_last` steps plus every step divisible by `keep_every` (Orbax's max_to_keep / keep_period); Orbax deletes
an old step only after the new one is committed.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import orbax.checkpoint as ocp

TMP_MARK = ".orbax-checkpoint-tmp"  # Orbax's suffix for a step directory still being written
# Test hook: "SECONDS" or "SECONDS@STEP" makes an async save sleep after all its files are written and before
# the rename that commits it (so a test can kill the process mid-save, deterministically). With
# JAXCHAT_TEST_SAVE_MARKER=path, a line is appended to that file when the sleep starts.
SAVE_DELAY_ENV = "JAXCHAT_TEST_SAVE_DELAY"
SAVE_MARKER_ENV = "JAXCHAT_TEST_SAVE_MARKER"


class CheckpointError(RuntimeError):
    """A checkpoint or run directory is missing, corrupt or does not fit; the message says what to do."""


def find_debris(run_dir: str | Path) -> list[Path]:
    """Orbax temporary step directories under checkpoints/: saves that never committed."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if TMP_MARK in p.name)


def remove_debris(run_dir: str | Path) -> list[str]:
    """Delete what interrupted saves left behind; returns the names removed. Call only while holding the run's
    lock (a live writer's temporary directory looks the same)."""
    removed = []
    for p in find_debris(run_dir):
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
        removed.append(p.name)
    return removed


class Checkpointer:
    """Orbax CheckpointManager for the {state, meta} of a run, with jaxchat's retention and error messages."""

    def __init__(self, run_dir: str | Path, keep_last: int = 2, keep_every: int = 0, async_save: bool = True,
                 read_only: bool = False):
        self.dir = Path(run_dir).absolute() / "checkpoints"
        if read_only and not self.dir.is_dir():
            raise CheckpointError(f"no checkpoint in {Path(run_dir)}: {self.dir} does not exist. Train the run "
                                  f"first (`jaxchat train --run-dir {run_dir}`), or pass the run directory that "
                                  f"holds checkpoints/.")
        self._saving: int | None = None
        async_options = None
        if async_save and os.environ.get(SAVE_DELAY_ENV):
            async_options = ocp.AsyncOptions(post_finalization_callback=self._test_delay)
        # (a reader does not pass Orbax's read_only, which only adds warnings: it never saves, so never deletes)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep_last, keep_period=keep_every or None,
                                               create=not read_only, enable_async_checkpointing=async_save,
                                               async_options=async_options)
        self.manager = ocp.CheckpointManager(self.dir, options=options)

    def _test_delay(self) -> None:
        spec = os.environ.get(SAVE_DELAY_ENV, "")
        seconds, _, only = spec.partition("@")
        if not seconds or (only and int(only) != self._saving):
            return
        if os.environ.get(SAVE_MARKER_ENV):
            with open(os.environ[SAVE_MARKER_ENV], "a") as f:
                f.write(f"{self._saving} {[p.name for p in find_debris(self.dir.parent)]}\n")
        time.sleep(float(seconds))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: dict, meta: dict) -> None:
        """Start saving `step`: returns once the arrays are copied off the device; files are written in the
        background. Waits first for the previous save, if it is still being written."""
        self.manager.wait_until_finished()
        self._saving = step
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, force=True)

    def _check_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                debris = find_debris(self.dir.parent)
                why = (f" (only an interrupted save, {debris[0].name}, never committed)" if debris else "")
                raise CheckpointError(
                    f"no committed checkpoint in {self.dir}{why}: the run stopped before its first save finished. "
                    f"Start it again with --force (its config.json is kept in the new run), or without --resume "
                    f"under another --run-dir.")
            return steps[-1]
        if step not in steps:
            raise CheckpointError(f"step {step} is not among the committed checkpoints in {self.dir}: available "
                                  f"steps are {steps}. Pass one of them (e.g. --step {steps[-1]}).")
        return step

    def _restore(self, step: int, args, what: str):
        try:
            return self.manager.restore(step, args=args)
        except Exception as e:  # orbax / tensorstore raise many types for unreadable or mismatched trees
            detail = " ".join(str(e).split())[:300]
            older = [s for s in self.all_steps() if s < step]
            fallback = (f"move {self.dir / str(step)} aside (e.g. `mv {self.dir / str(step)} "
                        f"{self.dir / str(step)}.bad`) and resume again from step {older[-1]}"
                        if older else "no older checkpoint is left; start the run again with --force")
            raise CheckpointError(
                f"could not read the {what} of checkpoint step {step} in {self.dir}: {type(e).__name__}: {detail}. "
                f"If the run's config.json or code changed since that save, restore them; if the files are damaged, "
                f"{fallback}. Nothing was deleted.") from None

    def read_meta(self, step: int | None = None) -> tuple[int, dict]:
        """(step, meta) of `step` (default: the latest committed one), without reading the arrays."""
        step = self._check_step(step)
        out = self._restore(step, ocp.args.Composite(meta=ocp.args.JsonRestore()), "metadata")
        return step, out["meta"]

    def restore(self, abstract_state: dict, step: int | None = None) -> tuple[dict, dict]:
        """Restore `step` (default: the latest committed one) into the structure (and shardings) of
        `abstract_state`, a pytree of jax.ShapeDtypeStruct."""
        step = self._check_step(step)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        out = self._restore(step, args, "state")
        return out["state"], out["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.manager.wait_until_finished()
        finally:
            self.manager.close()


