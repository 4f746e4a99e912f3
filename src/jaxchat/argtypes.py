"""argparse types that check a number's range, so a bad argument is refused, with its value named, before a
command reads or writes anything."""

from __future__ import annotations

import argparse
import math


def _number(kind, test, what):
    """An argparse type: `kind` parsed and checked (e.g. a finite float >= 0), else a message naming the value."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value
    parse.__name__ = what
    return parse


positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")
count_int = _number(int, lambda v: v >= 0, "an integer >= 0")
finite_non_negative = _number(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
positive_float = _number(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def step_range(text: str) -> tuple[int, int]:
    """A:B, the steps A..B-1 (1 <= A < B), e.g. `train --profile 5:8` traces steps 5, 6 and 7."""
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not A:B, e.g. 5:8 (steps 5, 6 and 7)") from None
    if not 1 <= a < b:
        raise argparse.ArgumentTypeError(f"{text!r}: need 1 <= A < B, e.g. 5:8 (steps 5, 6 and 7)")
    return a, b
