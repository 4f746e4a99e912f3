"""Experiment trackers: TensorBoard and Weights & Biases receive every record metrics.jsonl receives
(`train.trackers=tensorboard,wandb`). metrics.jsonl stays the source of truth: a tracker is a copy for viewing.

- tensorboard: event files under RUN/tensorboard/ (`tensorboard --logdir RUN/tensorboard`), written with the
  `tensorboard` package's own writer (no TensorFlow or PyTorch needed).
- wandb: a W&B run named `train.run_name` (default: the run directory's name) in `train.wandb_project`; its id
  is kept in RUN/trackers.json so a resumed run continues the same W&B run. `WANDB_MODE=offline` works as W&B
  documents (`wandb sync` uploads later).

Step records go under train/ (loss, grad_norm, lr, tok_per_s, mfu), evaluations under val/ (loss, bpb), both
at the run's step; the final summary goes to W&B's run summary. Both packages are optional: asking for one
that is not installed fails before the run starts, naming the extra to install.
"""

from __future__ import annotations

import importlib
import json
import secrets
from pathlib import Path

from jaxchat.config import Config, ConfigError
from jaxchat.fileio import write_json_atomic

EXTRA = "trackers"  # pip install 'jaxchat[trackers]'
MODULES = {"tensorboard": "tensorboard.summary", "wandb": "wandb"}


def require(name: str):
    """The tracker's module, or a ConfigError naming the extra that brings it."""
    try:
        return importlib.import_module(MODULES[name])
    except ImportError:
        raise ConfigError(f"train.trackers={name} needs the optional package `{name}`: pip install "
                          f"'jaxchat[{EXTRA}]' (or `pip install {name}`), or leave {name} out of "
                          f"train.trackers") from None


def check_trackers(cfg: Config) -> None:
    """Every requested tracker's package is importable (before anything is written)."""
    for name in cfg.train.tracker_names:
        require(name)


def scalars(rec: dict) -> dict[str, float]:
    """A metrics.jsonl record as tracker scalars: val_* -> val/*, the rest -> train/*."""
    out = {}
    for key, value in rec.items():
        if key in ("step", "time", "proc") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"] = float(value)
    return out


class TensorBoard:
    def __init__(self, cfg: Config, run_dir: Path):
        self.writer = require("tensorboard").Writer(str(run_dir / "tensorboard"))

    def log(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step=step)
        self.writer.flush()

    def finish(self, summary: dict) -> None:
        self.writer.close()


class WandB:
    def __init__(self, cfg: Config, run_dir: Path):
        wandb = require("wandb")
        ids_path = run_dir / "trackers.json"
        ids = json.loads(ids_path.read_text()) if ids_path.is_file() else {}
        if "wandb_id" not in ids:
            ids["wandb_id"] = secrets.token_hex(4)  # (W&B run ids are short lowercase alphanumerics)
            write_json_atomic(ids_path, ids)
        self.run = wandb.init(project=cfg.train.wandb_project, name=cfg.train.run_name or run_dir.name,
                              id=ids["wandb_id"], resume="allow", dir=str(run_dir), config=cfg.to_dict())

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def finish(self, summary: dict) -> None:
        self.run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
        self.run.finish()


KINDS = {"tensorboard": TensorBoard, "wandb": WandB}


class Trackers:
    """The trackers a run asked for (none for the processes other than 0)."""

    def __init__(self, cfg: Config, run_dir: Path, primary: bool = True):
        self.open = [KINDS[name](cfg, Path(run_dir)) for name in cfg.train.tracker_names] if primary else []

    def log(self, rec: dict) -> None:
        values = scalars(rec)
        for tracker in self.open:
            tracker.log(rec["step"], values)

    def finish(self, summary: dict) -> None:
        for tracker in self.open:
            tracker.finish(summary)
        self.open = []
