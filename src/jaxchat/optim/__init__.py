"""Optimizers.

- `adamw.py`: the seed cards' recipe (AdamW over everything, warmup-cosine, global-norm clipping);
- `muon.py`, `groups.py`, `schedules.py`, `scaling.py`: nanochat's recipe (Muon for block matrices, six AdamW
  groups, its schedules, and the depth/batch scaling rules that jaxchat/plan.py applies);
- `golf.py`: parameter golf's recipe (its Muon with the Newton-Schulz quintic, Adam groups, step warmdown).
"""

from __future__ import annotations

import json

import optax

from jaxchat.config import Config
from jaxchat.model.accounting import param_shapes
from jaxchat.optim import schedules
from jaxchat.optim.adamw import adamw, warmup_cosine
from jaxchat.optim import golf
from jaxchat.optim.groups import nanochat_optimizer


def muon_overrides(cfg: Config) -> dict:
    return json.loads(cfg.optim.groups) if cfg.optim.groups else {}


def build_optimizer(cfg: Config, params=None) -> optax.GradientTransformation:
    """The optimizer a run uses, chosen by `optim.optimizer`. `params` (arrays or shapes) is needed only to
    know which of nanochat's groups are present; by default it is derived from the model config."""
    if cfg.optim.optimizer == "adamw":
        if cfg.train.num_steps < 1:
            raise ValueError("build_optimizer needs a concrete num_steps: call jaxchat.plan.resolve first")
        return adamw(cfg.optim, cfg.train.num_steps)
    if params is None:
        params = param_shapes(cfg.model)
    if cfg.optim.optimizer == "golf":
        if cfg.train.num_steps < 1:
            raise ValueError("build_optimizer needs a concrete num_steps: call jaxchat.plan.resolve first")
        return golf.golf_optimizer(params, cfg.model, cfg.train.num_steps, muon_overrides(cfg),
                                   wallclock=cfg.train.max_seconds > 0)
    if not cfg.train.resolved:
        raise ValueError("build_optimizer needs concrete num_steps and batch_size: call jaxchat.plan.resolve first")
    batch_tokens = cfg.train.batch_size * cfg.model.sequence_len
    overrides = muon_overrides(cfg)
    if cfg.train.target_param_data_ratio > 0:
        overrides.setdefault("ratio", cfg.train.target_param_data_ratio)
    return nanochat_optimizer(params, cfg.model, cfg.train.num_steps, batch_tokens, overrides)


def lr_at(cfg: Config, step: int) -> float | None:
    """The peak-relative learning rate at `step` (AdamW: absolute lr; Muon recipe: the lr multiplier)."""
    if cfg.optim.optimizer == "adamw":
        return float(warmup_cosine(cfg.optim, cfg.train.num_steps)(step))
    if cfg.optim.optimizer == "golf":
        if cfg.train.max_seconds > 0:  # by wall clock: known to the loop only (the optimizer state holds it)
            return None
        return float(golf.lr_scale(step, cfg.train.num_steps, golf.hparams(cfg.model, muon_overrides(cfg))[
            "warmdown_iters"]))
    sched = {k: v for k, v in muon_overrides(cfg).items() if k in ("warmup_steps", "warmdown_ratio", "final_lr_frac")}
    return float(schedules.lr_multiplier(step, cfg.train.num_steps, **sched))


__all__ = ["build_optimizer", "lr_at"]
