"""Run directories and Orbax checkpoints of the full training state.

A run directory holds:
    config.json      the full Config of the run
    tokenizer.json   the tokenizer the run trained with
    metrics.jsonl    one JSON object per logged step / evaluation
    checkpoints/N/   Orbax checkpoint of step N: `state` (params, optimizer state, step) and `meta` (JSON)

Orbax writes each step into a temporary directory and renames it when complete, so a reader never sees a
partial step. Saves are asynchronous: training continues while the previous step is written; `close()` waits.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from jaxchat.config import Config


class CheckpointError(RuntimeError):
    """A checkpoint or run directory is missing, corrupt or does not fit; the message says what to do."""


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def load_run_config(run_dir: str | Path) -> Config:
    run_dir = Path(run_dir)
    path = run_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a jaxchat run directory: {path} does not exist. "
                              f"Pass the --run-dir a `jaxchat train` wrote (e.g. runs/tiny).")
    try:
        return Config.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} is not a valid jaxchat config ({e}); restore it from the run's "
                              f"checkpoints/*/meta or re-create the run.") from None


class Checkpointer:
    def __init__(self, run_dir: str | Path, keep: int = 2, async_save: bool = True):
        self.dir = Path(run_dir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.dir, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: dict, meta: dict, force: bool = True) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, force=force)

    def restore(self, abstract_state: dict, step: int | None = None) -> tuple[dict, dict]:
        """Restore `step` (default: the latest committed one) into the structure of `abstract_state`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.dir}: train first, or start without --resume")
        if step not in self.all_steps():
            raise CheckpointError(f"step {step} is not among the checkpoints in {self.dir}: "
                                  f"available steps are {self.all_steps()}")
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        try:
            out = self.manager.restore(step, args=args)
        except Exception as e:  # orbax raises many types for unreadable or mismatched trees
            raise CheckpointError(
                f"could not restore step {step} from {self.dir}: {type(e).__name__}: {str(e)[:400]}\n"
                f"Fix: check that the run's config.json matches the checkpoint (same model and optimizer), or "
                f"restore an older step with --step.") from None
        return out["state"], out["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) of a pytree of arrays, for restoring into the same layout."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
