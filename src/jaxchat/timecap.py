"""`train.max_seconds`: golf's time cap, and golf's wall-clock warmdown that goes with it (optim/golf.py)."""

from __future__ import annotations

import jax

from jaxchat.config import ConfigError
from jaxchat.optim import golf, muon_overrides


class TimeCap:
    """`train.max_seconds`: the run stops (then evaluates, saves and summarises as at its end) once its step time
    (the `train` part of time_s, over every process of the run: no setup, compile, evaluation or saving) reaches
    the cap; `--resume --set train.max_seconds=...` continues it. With golf's optimizer the lr scale is set
    before every step from the elapsed time (its wall-clock warmdown, optim/golf.py)."""

    def __init__(self, run, save):
        self.run, self.save, self.cap = run, save, run.cfg.train.max_seconds
        self.golf = self.cap > 0 and run.cfg.optim.optimizer == "golf"
        if self.cap > 0 and jax.process_count() > 1:
            raise ConfigError(f"train.max_seconds={self.cap:g} needs a single process (each process's clock would "
                              f"stop it at another step): set it to 0 for multi-process runs")
        if self.golf:
            self.warmdown = golf.hparams(run.cfg.model, muon_overrides(run.cfg))["warmdown_iters"]

    def elapsed(self) -> float:
        return self.save.totals()["train"]

    def reached(self, step: int) -> bool:
        if not self.cap:
            return False
        elapsed = self.elapsed()
        if elapsed < self.cap:
            return False
        self.run.log(f"\ntrain.max_seconds={self.cap:g} reached after {elapsed:.1f} s of training: stopping at "
                     f"step {step} of {self.run.cfg.train.num_steps}")
        return True

    def set_lr(self, state: dict, step: int) -> dict:
        if not self.golf:
            return state
        scale = golf.lr_scale_wallclock(self.elapsed(), step, self.cap, self.warmdown)
        return {**state, "opt_state": golf.set_wallclock_scale(state["opt_state"], scale)}
