"""nanochat's training schedules (docs/architecture.md §Schedules), as functions of (step, num_steps) that accept
Python ints or jnp scalars (so they run inside a jitted optax update, where `step` is the optimizer's count).

`step` is 0-based: the first optimizer update uses step 0, exactly as nanochat's loop, which sets the group
hyperparameters from `step` before calling `optimizer.step()`. `num_steps` (N) is a Python int.

Every schedule derives its breakpoints from N the way nanochat does (`round` is Python's round-half-even):

    warmdown_iters = round(warmdown_ratio * N)         # 0.65 N
    warmdown_start = N - warmdown_iters

lr multiplier (`lr_multiplier`):
    (step + 1) / warmup_steps                                   if step <  warmup_steps        (40)
    1                                                           elif step <= warmdown_start
    p + (1 - p) * final_lr_frac,  p = (N - step) / warmdown_iters   otherwise                   (0.05)
  so it is 1/40 at step 0, 1 at step 39, 1 up to and including warmdown_start, then falls linearly to
  1/warmdown_iters + (1 - 1/warmdown_iters) * 0.05 at the last step N-1 (it would reach 0.05 at step N).

Muon momentum (`muon_momentum`):
    0.85 + (0.97 - 0.85) * step / 400                           if step < 400  (checked first)
    0.97 * (1 - p) + 0.90 * p,  p = (step - warmdown_start) / warmdown_iters   elif step >= warmdown_start
    0.97                                                        otherwise

Muon weight decay (`muon_weight_decay`):
    wd * 0.5 * (1 + cos(pi * step / N))       (wd = 0.28, depth-scaled by the caller; cosine to 0 at N)
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from jaxchat.dtypes import F32


WARMUP_STEPS = 40
WARMDOWN_RATIO = 0.65
FINAL_LR_FRAC = 0.05
MOMENTUM_START, MOMENTUM_PEAK, MOMENTUM_END, MOMENTUM_RAMP = 0.85, 0.97, 0.90, 400
MUON_WEIGHT_DECAY = 0.28


def warmdown_iters(num_steps: int, warmdown_ratio: float = WARMDOWN_RATIO) -> int:
    """round(warmdown_ratio * num_steps), Python rounding as in nanochat."""
    return round(warmdown_ratio * num_steps)


def lr_multiplier(step, num_steps: int, warmup_steps: int = WARMUP_STEPS, warmdown_ratio: float = WARMDOWN_RATIO,
                  final_lr_frac: float = FINAL_LR_FRAC):
    """The factor every group's peak lr is multiplied by at `step` (see the module docstring)."""
    s = jnp.asarray(step, F32)
    wd_iters = warmdown_iters(num_steps, warmdown_ratio)
    warm = (s + 1.0) / max(warmup_steps, 1)
    p = (num_steps - s) / max(wd_iters, 1)
    down = p + (1.0 - p) * final_lr_frac
    return jnp.where(s < warmup_steps, warm, jnp.where(s <= num_steps - wd_iters, 1.0, down)).astype(F32)


def muon_momentum(step, num_steps: int, warmdown_ratio: float = WARMDOWN_RATIO, start: float = MOMENTUM_START,
                  peak: float = MOMENTUM_PEAK, end: float = MOMENTUM_END, ramp_steps: int = MOMENTUM_RAMP):
    """Muon's Nesterov momentum at `step`: start -> peak over ramp_steps, then peak -> end across the warmdown."""
    s = jnp.asarray(step, F32)
    wd_iters = warmdown_iters(num_steps, warmdown_ratio)
    wd_start = num_steps - wd_iters
    frac = s / ramp_steps
    ramp = (1.0 - frac) * start + frac * peak
    p = (s - wd_start) / max(wd_iters, 1)
    down = peak * (1.0 - p) + end * p
    return jnp.where(s < ramp_steps, ramp, jnp.where(s >= wd_start, down, peak)).astype(F32)


def muon_weight_decay(step, num_steps: int, weight_decay: float = MUON_WEIGHT_DECAY):
    """Muon's (cautious) weight decay at `step`: weight_decay * cosine from 1 at step 0 to 0 at num_steps."""
    s = jnp.asarray(step, F32)
    return (weight_decay * 0.5 * (1.0 + jnp.cos(math.pi * s / num_steps))).astype(F32)


__all__ = ["lr_multiplier", "muon_momentum", "muon_weight_decay", "warmdown_iters"]
