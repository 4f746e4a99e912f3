"""What a run shows while it runs: the progress line (step, loss, learning rate, tokens/s, MFU, device memory where
the runtime reports it) and how times, MFU, learning rates and memory are written."""

from __future__ import annotations

import sys
import time

import jax
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


def format_lr(key: str, value: float) -> str:
    """AdamW's learning rate, or the multiplier nanochat's recipe applies to every group's lr."""
    return f"lr {value:.3g}" if key == "lr" else f"lr x{value:.3f}"


def device_memory(device=None) -> tuple[int, int | None] | None:
    """(bytes in use, bytes limit or None) on the first local device, or None where the runtime reports no
    memory stats (CPU)."""
    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # not implemented by every backend
        return None
    if not stats or "bytes_in_use" not in stats:
        return None
    return int(stats["bytes_in_use"]), stats.get("bytes_limit")


def format_memory(mem) -> str:
    """` | mem 12.3/80.0 GiB` (in use / limit), or nothing without stats."""
    if mem is None:
        return ""
    used, limit = mem
    return f" | mem {used / 2**30:.1f}" + (f"/{limit / 2**30:.1f}" if limit else "") + " GiB"
