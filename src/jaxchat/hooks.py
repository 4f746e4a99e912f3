"""What the training loop does around its steps: report each step (with the non-finite policy), and every N steps
evaluate and save. Each is a hook of the loop (loop.py); trackers plug in the same way (weight averaging
runs inside the train step instead: averaging.py).

A periodic hook has `every` (0: never) and is called as `hook(step, state)` after the step that makes `step`
a multiple of it, except the last step: the loop evaluates and saves that one itself (`finish`). Hooks run in
the order given; the report of a step comes before its evaluation, and the evaluation before its checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax

from jaxchat.clock import PARTS
from jaxchat.display import Progress, device_memory, format_lr, format_memory, format_mfu
from jaxchat.evaluate import evaluate
from jaxchat.fileio import append_jsonl, read_jsonl
from jaxchat.model.accounting import mfu
from jaxchat.optim import lr_at
from jaxchat.trackers import Trackers
from jaxchat.train import NonFiniteError, rows_sharding


class MetricsLog:
    """metrics.jsonl of a run: one record per step and per evaluation, stamped with the time and the process
    (process 0 writes; the others only count), copied to the run's trackers (trackers.py)."""

    def __init__(self, run_dir: Path, proc: float, write: bool, trackers: Trackers):
        self.path, self.proc, self.write, self.trackers = Path(run_dir) / "metrics.jsonl", proc, write, trackers
        self.evaluated = {r["step"] for r in read_jsonl(self.path)[0] if "val_loss" in r}  # (a resumed run's)

    def __call__(self, rec: dict) -> None:
        if self.write:
            append_jsonl(self.path, [{**rec, "time": round(time.time(), 3), "proc": self.proc}])
            self.trackers.log(rec)


class Reporter:
    """Fetches a step's metrics, applies the non-finite policy, logs the record and updates the progress line.
    Metrics are fetched one step late (`push` logs the previous step while this one runs), or at once when
    dispatch is synchronous (cpu_runtime.py: the step has already run). Tokens/s counts the data and train time
    since the previous record."""

    def __init__(self, run, counts, peak, metrics: MetricsLog, progress: Progress, synchronous: bool):
        self.cfg, self.counts, self.peak, self.n_dev = run.cfg, counts, peak, run.mesh.size
        self.clock, self.metrics, self.progress, self.synchronous = run.clock, metrics, progress, synchronous
        self.pending = None
        self.busy = self._busy()
        # AdamW (seed cards): the learning rate itself; nanochat's recipe: the multiplier of every group's lr
        self.lr_key = "lr" if run.cfg.optim.optimizer == "adamw" else "lr_multiplier"

    def _busy(self) -> float:
        p = self.clock.read()
        return p["train"] + p["data"]

    def push(self, step: int, metrics) -> None:
        self.flush()
        self.pending = (step, metrics)
        if self.synchronous:
            self.flush()

    def flush(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self.report(*pending)

    def report(self, step: int, metrics) -> dict:
        m = jax.device_get(metrics)
        busy = self._busy()
        dt, self.busy = max(busy - self.busy, 1e-9), busy
        cfg = self.cfg
        tps = cfg.train.batch_size * cfg.model.sequence_len / dt
        u = mfu(self.counts.flops["total"], tps, self.peak, self.n_dev)
        rec = {"step": step, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
               self.lr_key: lr_at(cfg, step - 1),  # (the update that made step `step` is the optimizer's step - 1)
               "tok_per_s": round(tps, 1), "skipped": int(m["skipped"])}
        if u is not None:
            rec["mfu"] = round(u, 4)
        mem = device_memory()  # (None on CPU: its runtime reports no memory stats)
        if mem is not None:
            rec["mem_gib"] = round(mem[0] / 2**30, 3)
        self.metrics(rec)
        if not m["finite"]:
            if cfg.train.nonfinite == "halt":
                raise NonFiniteError(
                    f"step {step}: loss {rec['loss']} / grad norm {rec['grad_norm']} is not finite; the update was "
                    f"discarded and training halted, so every checkpoint on disk holds finite values (the latest "
                    f"is the one to resume from). Lower optim.lr or check the data, or set train.nonfinite=skip to "
                    f"skip such steps.")
            self.progress.write(f"step {step}: non-finite loss or gradient; update skipped "
                                f"({rec['skipped']} skipped so far)")
        self.progress.update(step, f"loss {rec['loss']:.4f} | {format_lr(self.lr_key, rec[self.lr_key])} | "
                                   f"{tps:,.0f} tok/s | MFU {format_mfu(u)}" + format_memory(mem))
        return rec


class Evaluate:
    """Validation loss and bits per byte of the params, logged once per step (a resumed run's evaluations are
    not repeated in metrics.jsonl)."""

    def __init__(self, run, eval_step, rows, metrics: MetricsLog, progress: Progress):
        self.every = run.cfg.train.eval_every
        self.run, self.eval_step, self.rows, self.metrics, self.progress = run, eval_step, rows, metrics, progress

    def measure(self, step: int, state) -> dict:
        run = self.run
        with run.clock("eval"):
            out = evaluate(self.eval_step, state["params"], self.rows, run.micro, rows_sharding(run.mesh))
        if step not in self.metrics.evaluated:
            self.metrics({"step": step, **out})
        return out

    def __call__(self, step: int, state) -> None:
        ev = self.measure(step, state)
        self.progress.write(f"step {step}: val loss {ev['val_loss']:.4f} | val bpb {ev['val_bpb']:.4f}")


class Save:
    """A checkpoint of the state, with the run's config, its wall-time split so far and this process's id."""

    def __init__(self, run):
        self.every = run.cfg.train.save_every
        self.run = run

    def totals(self) -> dict:
        """The run's cumulative wall-time split so far (over every process, resume.py)."""
        now = self.run.clock.read()
        return {k: self.run.prior.get(k, 0.0) + now[k] for k in PARTS}

    def __call__(self, step: int, state) -> None:
        run = self.run
        with run.clock("checkpoint"):
            run.ckpt.save(step, state, {"config": run.cfg.to_dict(), "time_s": self.totals(),
                                        "saved_at": time.time(), "proc": run.proc})


def due(hook, step: int, last: int) -> bool:
    return bool(hook.every) and step % hook.every == 0 and step < last
