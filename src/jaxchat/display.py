"""What a run shows while it runs: the progress line and how times and MFU are written."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    """A live progress line on a terminal (tqdm: step, loss, tokens/s, MFU, ETA); plain log lines otherwise;
    nothing at all when not `shown` (the processes other than 0 of a multi-process run)."""

    def __init__(self, total: int, initial: int, log_every: int, shown: bool = True):
        self.shown = shown
        self.tty = shown and sys.stderr.isatty()
        self.log_every = log_every
        self.total = total
        self.t0 = time.perf_counter()
        self.initial = initial
        if self.tty:
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(self, step: int, text: str) -> None:
        if self.tty:
            self.bar.n = step
            self.bar.set_postfix_str(text, refresh=True)
        elif self.shown and (step % self.log_every == 0 or step == self.total):
            done = step - self.initial
            el = time.perf_counter() - self.t0
            eta = el / max(done, 1) * (self.total - step)
            print(f"step {step:>6}/{self.total} | {text} | eta {fmt_time(eta)}", flush=True)

    def write(self, text: str) -> None:
        if self.tty:
            self.bar.write(text)
        elif self.shown:
            print(text, flush=True)

    def close(self):
        if self.tty:
            self.bar.close()


def fmt_time(sec: float) -> str:
    sec = int(max(sec, 0))
    return f"{sec // 3600}:{sec % 3600 // 60:02d}:{sec % 60:02d}" if sec >= 3600 else f"{sec // 60}:{sec % 60:02d}"


def format_mfu(m: float | None) -> str:
    return "n/a (unknown peak)" if m is None else f"{100 * m:.1f}%"
