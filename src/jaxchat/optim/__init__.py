"""Optimizers: `adamw.py` (the seed cards' recipe)."""

from __future__ import annotations

import optax

from jaxchat.config import Config
from jaxchat.optim.adamw import adamw, warmup_cosine


def build_optimizer(cfg: Config, params) -> optax.GradientTransformation:
    """The optimizer a run uses, chosen by `optim.optimizer`."""
    return adamw(cfg.optim, cfg.train.num_steps)


def lr_at(cfg: Config, step: int) -> float:
    return float(warmup_cosine(cfg.optim, cfg.train.num_steps)(step))


__all__ = ["build_optimizer", "lr_at"]
