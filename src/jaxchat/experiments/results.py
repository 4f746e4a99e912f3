"""The numbers a results table reads from a run directory.

The smooth loss is nanochat's and flaxchat's debiased exponential moving average of the train loss, beta 0.9,
over every step in order: s = 0.9 s + 0.1 loss; smooth = s / (1 - 0.9^(i+1)) after the i-th step (i from 0).
"""

from __future__ import annotations

import json
from pathlib import Path

from jaxchat.config import Config
from jaxchat.fileio import read_jsonl

SMOOTH_BETA = 0.9


def smooth_losses(losses: list[float], beta: float = SMOOTH_BETA) -> list[float]:
    """The debiased EMA after each step."""
    out, s = [], 0.0
    for i, loss in enumerate(losses):
        s = beta * s + (1 - beta) * loss
        out.append(s / (1 - beta ** (i + 1)))
    return out


def step_records(run_dir: Path) -> list[dict]:
    """The step records of metrics.jsonl in step order (each step once: rundir.reconcile_metrics)."""
    return sorted((r for r in read_jsonl(Path(run_dir) / "metrics.jsonl")[0] if "loss" in r), key=lambda r: r["step"])


def curve_summary(records: list[dict]) -> dict:
    """final_loss and smooth_final_loss of a run's step records."""
    losses = [r["loss"] for r in records]
    return {"final_loss": losses[-1] if losses else None,
            "smooth_final_loss": smooth_losses(losses)[-1] if losses else None}


def read_run(run_dir: Path) -> dict:
    """A finished run as a table row: its config, summary.json and its curves. Raises FileNotFoundError for a
    run that has not finished (no summary.json)."""
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    cfg = Config.from_dict(json.loads((run_dir / "config.json").read_text()))
    records = step_records(run_dir)
    evals = sorted((r for r in read_jsonl(run_dir / "metrics.jsonl")[0] if "val_loss" in r), key=lambda r: r["step"])
    return {"dir": run_dir, "cfg": cfg, "summary": summary, "steps": records, "evals": evals}
