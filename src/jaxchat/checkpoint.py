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

Integrity (integrity.py): each save records a checksum of every array and of the metadata; every restore
recomputes them and refuses a damaged step, naming the array and the latest step that is intact. A save that
fails (a full disk, say) is reported at that save's step: free space is checked before it starts, and the
loop `poll`s the background write every step.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from jaxchat.integrity import array_problems, meta_problem, seal

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
        """Start saving `step`, its metadata sealed with the state's checksums: returns once the arrays are copied
        off the device; files are written in the background. Waits first for the previous save, if it is still
        being written, and refuses to start when the disk cannot hold the new step."""
        self.wait()
        self._check_space(step, state)
        self._saving = step
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(seal(meta, state)))
        try:
            self.manager.save(step, args=args, force=True)
        except OSError as e:
            raise self._save_failed(step, e) from None

    def _check_space(self, step: int, state: dict) -> None:
        need = sum(x.nbytes for x in jax.tree.leaves(state))
        self.dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.dir).free
        if free < need * 1.05 + (64 << 20):
            raise CheckpointError(
                f"cannot save checkpoint step {step}: it needs about {need / 2**20:,.0f} MiB and {self.dir} has "
                f"{free / 2**20:,.0f} MiB free; {self._committed()}. Free disk space (or lower train.keep_last), "
                f"then resume with `jaxchat train --run-dir {self.dir.parent} --resume`.")

    def _committed(self) -> str:
        steps = self.all_steps()
        return f"the committed checkpoints {steps} are intact" if steps else "no checkpoint had been committed yet"

    def _save_failed(self, step, e: BaseException) -> CheckpointError:
        detail = " ".join(str(e).split())
        detail = detail if len(detail) <= 400 else f"{detail[:200]} ... {detail[-200:]}"  # (the cause is last)
        return CheckpointError(
            f"saving checkpoint step {step} failed: {type(e).__name__}: {detail}. That step was not committed; "
            f"{self._committed()}. Fix the cause (disk space, file size limit, permissions), then resume with "
            f"`jaxchat train --run-dir {self.dir.parent} --resume`.")

    def poll(self) -> None:
        """Raise now if the save being written in the background has failed (the loop calls this every step)."""
        if self._saving is None:
            return
        try:
            self.manager.check_for_errors()
        except Exception as e:  # orbax re-raises whatever the writer thread hit
            raise self._save_failed(self._saving, e) from None

    def _check_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                debris = find_debris(self.dir.parent)
                why = (f" (only an interrupted save, {debris[0].name}, never committed)" if debris else "")
                raise CheckpointError(
                    f"no committed checkpoint in {self.dir}{why}: the run stopped before its first save finished. "
                    f"`jaxchat train --run-dir {self.dir.parent} --resume` trains it from step 0 with its recorded "
                    f"config.json.")
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
            raise self._damaged(step, f"could not read the {what}: {type(e).__name__}: {detail}",
                                "If the run's config.json or code changed since that save, restore them; if the "
                                "files are damaged, ") from None

    def _damaged(self, step: int, what: str, hint: str = "", abstract_state: dict | None = None) -> CheckpointError:
        """The error for a damaged step: names it and the latest older step that is intact (verified in full when
        the state's structure is known, else by its metadata)."""
        intact = None
        for older in reversed([s for s in self.all_steps() if s < step]):
            try:
                if abstract_state is not None:
                    self.restore(abstract_state, older)
                else:
                    self.read_meta(older)
                intact = older
                break
            except CheckpointError:
                continue
        where = self.dir / str(step)
        fallback = (f"move {where} aside (e.g. `mv {where} {where}.bad`) and resume again from step {intact}, the "
                    f"latest intact checkpoint" if intact is not None
                    else "no older intact checkpoint is left; start the run again with --force")
        fix = hint + fallback
        return CheckpointError(f"checkpoint step {step} in {self.dir} is damaged: {what}. {fix[0].upper()}{fix[1:]}. "
                               f"Nothing was deleted.")

    def read_meta(self, step: int | None = None) -> tuple[int, dict]:
        """(step, meta) of `step` (default: the latest committed one), without reading the arrays; the metadata
        is checked against its own checksum."""
        step = self._check_step(step)
        meta = self._restore(step, ocp.args.Composite(meta=ocp.args.JsonRestore()), "metadata")["meta"]
        problem = meta_problem(meta) if isinstance(meta, dict) else "its metadata is not a JSON object"
        if problem:
            raise self._damaged(step, problem)
        return step, meta

    def restore(self, abstract_state: dict, step: int | None = None) -> tuple[dict, dict]:
        """Restore `step` (default: the latest committed one) into the structure (and shardings) of
        `abstract_state`, a pytree of jax.ShapeDtypeStruct, and verify every array against its checksum."""
        step, meta = self.read_meta(step)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        state = self._restore(step, args, "state")["state"]
        if "integrity" not in meta:
            print(f"note: checkpoint step {step} in {self.dir} was saved without checksums (by an older jaxchat or "
                  f"an import); its arrays are not verified", file=sys.stderr)
            return state, meta
        bad = array_problems(meta, state)
        if bad:
            raise self._damaged(step, f"{len(bad)} array(s) differ from the checksums recorded at save time: "
                                      f"{', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}",
                                abstract_state=abstract_state)
        return state, meta

    def wait(self) -> None:
        """Block until the save in flight is written; a failure is reported with its step."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # orbax re-raises whatever the writer thread hit
            raise self._save_failed(self._saving, e) from None
        finally:
            self._saving = None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()


