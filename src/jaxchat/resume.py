"""Continuing a run: the checks a resumed run must pass, and the repair of what a killed process left behind.

A resume reads the latest committed checkpoint (or, when the run was killed before its first save, starts from
step 0 with the run's recorded config), checks that this command's config, dataset and tokenizer are the run's,
then repairs the run directory: debris of interrupted saves removed, metrics.jsonl cut back to the checkpoint,
files a run killed early never wrote written now, and one record appended to restarts.jsonl.

restarts.jsonl is the run's history of restarts: every resume that continues the run appends one record (steps
and seconds lost since the checkpoint it resumed from), so the counts in summary.json stay true when a resume is
itself killed before its first checkpoint (the checkpoint's metadata cannot know of it). A process killed before
its repair (while loading) changed and lost nothing, and is not counted: the next resume does the same work.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax

from jaxchat.checkpoint import Checkpointer, CheckpointError, remove_debris
from jaxchat.config import EXECUTION_FIELDS, Config, ConfigError
from jaxchat.dtypes import resolve_compute_dtype
from jaxchat.data.tokenizer import Tokenizer, find_tokenizer_file
from jaxchat.distributed import together
from jaxchat.fileio import append_jsonl, read_jsonl, write_json_atomic
from jaxchat.rundir import is_marked, mark_run_dir, reconcile_metrics, remove_stale_temporaries


AVERAGING_FIELDS = ("ema_decay", "swa_lr_below", "swa_every")  # the EMA / SWA live in the state (averaging.py)

def check_resume_config(cfg: Config, saved: Config, batch: bool = True) -> None:
    """The model, optimizer and data of a resumed run must be the checkpoint's; so must the global batch (a
    batch is a function of (seed, step, batch size): another size would repeat or skip data), unless `batch` is
    False (a checkpoint imported from elsewhere, whose data order was never jaxchat's, or no checkpoint yet)."""
    same = lambda sec, k, a, b: (a == b or (sec == "model" and k in EXECUTION_FIELDS)
                                  or (k == "compute_dtype" and resolve_compute_dtype(a) == resolve_compute_dtype(b)))
    diffs = [f"{sec}.{k}: checkpoint has {v!r}, now {getattr(getattr(cfg, sec), k)!r}"
             for sec in ("model", "optim", "data") for k, v in getattr(saved, sec).__dict__.items()
             if not same(sec, k, getattr(getattr(cfg, sec), k), v)]
    diffs += [f"train.{k}: checkpoint has {getattr(saved.train, k)!r}, now {getattr(cfg.train, k)!r}"
              for k in AVERAGING_FIELDS if getattr(saved.train, k) != getattr(cfg.train, k)]  # (in the state)
    if batch and cfg.train.batch_size != saved.train.batch_size:
        diffs.append(f"train.batch_size: checkpoint has {saved.train.batch_size}, now {cfg.train.batch_size}")
    if diffs:
        raise ConfigError("--resume with a config that does not fit the run's checkpoint:\n  " + "\n  ".join(diffs)
                          + "\nFix: resume with the run's own config (omit --preset and those --set), or start a "
                            "new run under another --run-dir. Nothing was changed.")


def load_run_tokenizer(run_dir: Path) -> Tokenizer:
    path = find_tokenizer_file(run_dir) or Path(run_dir) / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: copy the tokenizer the run trained with there")
    try:
        return Tokenizer.load(path)
    except ValueError as e:
        raise CheckpointError(f"the run's {path} is damaged ({str(e)[:200]}): copy the tokenizer the run trained "
                              f"with there (e.g. from the dataset directory, or retrain it with the run's data "
                              f"config under another --run-dir and copy its tokenizer.json)") from None


def check_run_tokenizer(run_dir: Path, tokenizer: Tokenizer) -> None:
    path = find_tokenizer_file(run_dir) or run_dir / "tokenizer.json"
    if path.is_file() and load_run_tokenizer(run_dir).fingerprint() != tokenizer.fingerprint():
        raise CheckpointError(f"the data config now yields a different tokenizer than the run's {path}: its token "
                              f"ids would mean other text. Resume with the run's own data config (and Python "
                              f"version, for the stdlib corpus), or set data.tokenizer_path={str(path)!r}.")


def restore_latest(cfg: Config, ckpt: Checkpointer, abstract: dict):
    """(state, meta) of the latest committed step, checked against this config first (from its metadata, before
    the arrays); (None, {}) when the run has no committed checkpoint yet (it restarts from step 0)."""
    if not ckpt.all_steps():
        return None, {}
    step, meta = ckpt.read_meta()
    check_resume_config(cfg, Config.from_dict(meta["config"]), batch="imported_from" not in meta)
    return ckpt.restore(abstract, step)


def repair(run_dir: Path, step: int, meta: dict, ckpt: Checkpointer, ds, log, write: bool = True) -> tuple[dict, dict]:
    """Make the run directory fit a resume from `step` and account the lost progress. Returns (prior, history):
    the run's wall-time split up to the checkpoint plus all time lost to restarts, and the restart counts. Every
    process reads the run's files for them; then the one that `write`s (process 0) changes the run directory
    while the others wait."""
    with together("reading the run's metrics"):
        rec = reconcile_metrics(run_dir, step, meta, write=False)
        prior, history = resumed_totals(run_dir, meta, rec)
    with together("repairing the run directory"):
        if write:
            _write_repair(run_dir, step, ckpt, ds, rec, history, log)
    return prior, history


def _write_repair(run_dir: Path, step: int, ckpt: Checkpointer, ds, rec: dict, history: dict, log) -> None:
    """Process 0's part of a resume: adopt an unmarked run, write what a run killed early never wrote, remove
    the debris, cut metrics.jsonl back, log and record the restart."""
    if not is_marked(run_dir):
        mark_run_dir(run_dir, "train --resume (a run made before jaxchat marked its runs)")
    if find_tokenizer_file(run_dir) is None:
        ds.tokenizer.save(run_dir / ds.tokenizer.file_name)
    if not (run_dir / "data.json").is_file():
        write_json_atomic(run_dir / "data.json", {k: v for k, v in ds.info.items() if k != "timings_s"})
    removed = remove_debris(run_dir)
    temporaries = remove_stale_temporaries(run_dir)
    if temporaries:
        log(f"resume: removed {len(temporaries)} temporary file(s) of a write that never finished: "
            f"{', '.join(temporaries)}")
    if removed:
        log(f"resume: removed {len(removed)} incomplete checkpoint(s) left by an interrupted save: "
            f"{', '.join(removed)} (never committed; Orbax renames a step into place only when it is complete)")
    reconcile_metrics(run_dir, step, {})
    if rec["dropped"]:
        lost = rec["lost_steps"]
        span = f"steps {lost[0]}-{lost[-1]}" if len(lost) > 1 else (f"step {lost[0]}" if lost else "no steps")
        log(f"resume: metrics.jsonl had {rec['dropped']} record(s) after step {step} ({span}), logged by a "
            f"process that died after its last checkpoint; moved them to metrics.discarded.jsonl (they are "
            f"recomputed now)")
    if rec["unreadable_lines"] or rec["duplicates"]:
        log(f"resume: metrics.jsonl: dropped {rec['unreadable_lines']} unreadable line(s) and "
            f"{rec['duplicates']} duplicate record(s)")
    lost = (f"; the interrupted process lost {len(rec['lost_steps'])} step(s), {rec['lost_s']:.1f}s of work, "
            f"since that checkpoint" if rec["dropped"] else "")
    if ckpt.all_steps():
        log(f"resumed {run_dir} at step {step} (the latest committed checkpoint of {ckpt.all_steps()}){lost}")
    else:
        log(f"resumed {run_dir} from step 0 with its recorded config.json: it has no committed checkpoint (it "
            f"stopped before its first save){lost}")
    append_jsonl(run_dir / "restarts.jsonl", [{"time": round(time.time(), 3), "step": step, "removed": removed,
                                               **rec, "history": history}])


def resumed_totals(run_dir: Path, meta: dict, rec: dict) -> tuple[dict, dict]:
    """(prior, history) of a resumed run: the checkpoint's wall-time split, with `restarts` the time lost over
    every restart so far (restarts.jsonl) plus this one, and the counts over all of them."""
    earlier, _ = read_jsonl(Path(run_dir) / "restarts.jsonl")
    history = {"restarts": len(earlier) + 1,
               "lost_steps": sum(len(r.get("lost_steps", ())) for r in earlier) + len(rec["lost_steps"])}
    prior = {k: float(v) for k, v in (meta.get("time_s") or {}).items()}
    prior["restarts"] = sum(float(r.get("lost_s", 0.0)) for r in earlier) + rec["lost_s"]
    return prior, history


def committed_steps(run_dir: Path) -> list[int]:
    """The checkpoint steps committed in a run directory (Orbax renames a step into place only when complete)."""
    ckpts = Path(run_dir) / "checkpoints"
    return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.is_dir() else []


def continue_hint(run_dir: Path) -> str:
    """What a stopped run's directory holds now, and the command that continues it."""
    if not is_marked(run_dir):
        return "nothing was written; run the same command again"
    steps = committed_steps(run_dir)
    at = f"from its latest checkpoint, step {steps[-1]}" if steps else "from step 0 (it has no checkpoint yet)"
    try:  # (a fine-tuning run records its sources in data.json: chat/sft.py)
        sft = json.loads((Path(run_dir) / "data.json").read_text()).get("source") == "sft"
    except (OSError, ValueError, AttributeError):
        sft = False
    command = f"jaxchat sft --out {run_dir}" if sft else f"jaxchat train --run-dir {run_dir}"
    return f"`{command} --resume` continues it {at} with its recorded config"


def out_of_memory_message(cfg: Config, micro: int, run_dir: Path, error: Exception) -> str:
    B, A, T = cfg.train.batch_size, cfg.train.grad_accum, cfg.model.sequence_len
    first = str(error).strip().splitlines()[0][:200].rstrip(".")
    steps = committed_steps(run_dir)
    if steps:
        fix = (f"resume with the same batch in smaller pieces: `jaxchat train --run-dir {run_dir} --resume --set "
               f"train.grad_accum={2 * A}` (continues from step {steps[-1]})")
    else:
        fix = (f"rerun with a smaller batch: `jaxchat train --run-dir {run_dir} --resume --set "
               f"train.batch_size={max(B // 2, 1)}` (the run has no checkpoint yet, so it starts from step 0 with its "
               f"recorded config and the new batch), or --set train.grad_accum={2 * A} to keep the batch")
    return (f"out of memory running the train step (batch {B} x {T}, micro-batch {micro} per step over "
            f"{jax.device_count()} {jax.devices()[0].device_kind} device(s)): {first}. Fix: {fix}; "
            f"`jaxchat train --dry-run` finds the largest batch that fits.")
