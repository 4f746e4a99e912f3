"""Weight averaging: an EMA and an SWA of the params, kept in the train state (so checkpoints and exact resume carry
them bitwise), chosen for eval, sample and export with `--weights raw|ema|swa`.

PR #334's recipe (SPEC_SPEEDRUN §2), generalised to any run, both off by default:
- EMA (`train.ema_decay` = d > 0): starts as the initial params; after every optimizer step
  `ema = ema * d + params * (1 - d)`, in fp32 (golf: 0.997).
- SWA (`train.swa_lr_below` = f > 0, `train.swa_every` = k): the uniform average of the params after each step i
  (0-based optimizer step; its update used lr scale s(i)) with s(i) < f, past the lr warmup, and (i + 1) % k == 0
  (golf: f = 0.4, k = 1; other entries k = 50). The state holds the running sum and the count; the average is
  sum / count, as the reference's `swa_state / swa_count`.
The lr scale s is the run's schedule relative to its peak: the Muon recipe's multiplier (optim/schedules.py), or
AdamW's warmup-cosine lr / optim.lr. The warmup is excluded, where s also starts small.

The update runs inside the jitted train step (train.make_train_step), on the params the step keeps (a skipped
non-finite step leaves them as they were, and the EMA still decays towards them), so it costs one fused
elementwise pass over the params and no host sync.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxchat.checkpoint import CheckpointError
from jaxchat.config import Config
from jaxchat.dtypes import F32
from jaxchat.optim import muon_overrides, schedules
from jaxchat.optim.adamw import warmup_cosine

WEIGHTS = ("raw", "ema", "swa")


class Averaging:
    """The EMA / SWA of one run's config: `init(params)` makes the state's "avg" entry, `update(avg, params,
    step)` advances it after optimizer step `step` (traced)."""

    def __init__(self, cfg: Config):
        t = cfg.train
        self.ema_decay, self.swa_below, self.swa_every = t.ema_decay, t.swa_lr_below, t.swa_every
        self.lr_scale, self.warmup = lr_scale_fn(cfg)

    @classmethod
    def from_config(cls, cfg: Config) -> "Averaging | None":
        return cls(cfg) if cfg.train.ema_decay > 0 or cfg.train.swa_lr_below > 0 else None

    def init(self, params) -> dict:
        avg = {}
        if self.ema_decay > 0:
            avg["ema"] = jax.tree.map(lambda p: jnp.array(p, F32, copy=True), params)  # (own buffers: donated)
        if self.swa_below > 0:
            avg["swa_sum"] = jax.tree.map(lambda p: jnp.zeros(p.shape, F32), params)
            avg["swa_count"] = jnp.int32(0)
        return avg

    def swa_due(self, step):
        """Whether the params after optimizer step `step` (0-based, traced) join the SWA."""
        return ((step >= self.warmup) & (self.lr_scale(step) < self.swa_below)
                & ((step + 1) % self.swa_every == 0))

    def update(self, avg: dict, params, step) -> dict:
        new = {}
        if "ema" in avg:
            d = F32(self.ema_decay)
            new["ema"] = jax.tree.map(lambda e, p: e * d + p.astype(F32) * (1 - d), avg["ema"], params)
        if "swa_sum" in avg:
            due = self.swa_due(step)
            new["swa_sum"] = jax.tree.map(lambda s, p: jnp.where(due, s + p.astype(F32), s), avg["swa_sum"], params)
            new["swa_count"] = avg["swa_count"] + due.astype(jnp.int32)
        return new


def lr_scale_fn(cfg: Config):
    """(s, warmup): s(step) the lr relative to its peak at optimizer step `step` (traceable), and the number of
    warmup steps (during which s rises from near 0 and SWA does not collect)."""
    n = cfg.train.num_steps
    if cfg.optim.optimizer == "adamw":
        sched, peak = warmup_cosine(cfg.optim, n), cfg.optim.lr
        return (lambda step: sched(step) / peak), min(cfg.optim.warmup_steps, max(n - 1, 0))
    kw = {k: v for k, v in muon_overrides(cfg).items() if k in ("warmup_steps", "warmdown_ratio", "final_lr_frac")}
    return (lambda step: schedules.lr_multiplier(step, n, **kw)), kw.get("warmup_steps", schedules.WARMUP_STEPS)


def select_weights(state: dict, which: str, where: str = "the run") -> dict:
    """The params to evaluate, sample or export: the trained ones (raw), the EMA, or the SWA average; a clear
    error when `where` has none of that kind."""
    if which not in WEIGHTS:
        raise CheckpointError(f"--weights {which!r}: choose one of {', '.join(WEIGHTS)}")
    if which == "raw":
        return state["params"]
    avg = state.get("avg", {})
    if which == "ema":
        if "ema" not in avg:
            raise CheckpointError(f"{where} has no EMA weights: it was trained with train.ema_decay=0. Train with "
                                  f"--set train.ema_decay=0.997 (golf's), or use --weights raw.")
        return avg["ema"]
    if "swa_sum" not in avg:
        raise CheckpointError(f"{where} has no SWA weights: it was trained with train.swa_lr_below=0. Train with "
                              f"--set train.swa_lr_below=0.4 (golf's), or use --weights raw or ema.")
    count = int(avg["swa_count"])
    if count == 0:
        raise CheckpointError(f"{where} collected no SWA weights yet at step {int(state['step'])}: the lr scale "
                              f"has not fallen below train.swa_lr_below after the warmup (every train.swa_every "
                              f"steps). Evaluate a later checkpoint, or use --weights raw or ema.")
    return jax.tree.map(lambda s: s / F32(count), avg["swa_sum"])
