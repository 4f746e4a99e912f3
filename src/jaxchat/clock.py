"""Wall-time accounting: every moment of a process is charged to exactly one part of a run, so the parts add up
to the total (summary.json's `time_s`; cumulative over the processes of a resumed run, see resume.py)."""

from __future__ import annotations

import contextlib
import time

PARTS = ("setup", "data", "compile", "train", "eval", "checkpoint", "sample", "restarts", "other")


class Clock:
    """Charges every moment of this process's wall time to exactly one part: `with clock("eval"): ...`."""

    def __init__(self, part: str = "setup"):
        self.parts = dict.fromkeys(PARTS, 0.0)
        self.t0 = self.mark = time.perf_counter()
        self.current = part

    def switch(self, part: str) -> str:
        now = time.perf_counter()
        self.parts[self.current] += now - self.mark
        self.mark, (prev, self.current) = now, (self.current, part)
        return prev

    @contextlib.contextmanager
    def __call__(self, part: str):
        prev = self.switch(part)
        try:
            yield
        finally:
            self.switch(prev)

    def read(self) -> dict:
        self.switch(self.current)
        return dict(self.parts)
