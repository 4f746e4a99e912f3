"""The calculator tool the model calls between <|python_start|> and <|python_end|> (nanochat's tool protocol).

Only arithmetic is evaluated: numbers, + - * / // %, unary signs and parentheses; thousands separators (commas)
are dropped first, as nanochat does. Anything else (names, calls, attributes, strings, powers, comparisons)
is refused and returns None, and the engine then forces no output, as nanochat does on a failed call.
Python's `eval` is never used: the expression is parsed with `ast` and walked node by node, so there is
nothing to escape from. Sizes are bounded so no expression can take long: at most MAX_CHARS characters and
results of at most MAX_DIGITS digits.

The result is `str()` of the Python value (7/2 -> "3.5", 4/2 -> "2.0"), the text nanochat's models were
trained to read.
"""

from __future__ import annotations

import ast
import math
import operator

MAX_CHARS = 200
MAX_DIGITS = 100

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


class Refused(Exception):
    """The expression is not plain arithmetic, or its value is out of bounds."""


def calculate(expr: str) -> str | None:
    """The value of an arithmetic expression as text, or None if it is anything but arithmetic."""
    expr = expr.replace(",", "").strip()
    if not expr or len(expr) > MAX_CHARS:
        return None
    try:
        tree = ast.parse(expr, mode="eval")
        return str(_value(tree.body))
    except (SyntaxError, Refused, ArithmeticError, ValueError):
        return None


def _value(node):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _bounded(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _bounded(_BINARY[type(node.op)](_value(node.left), _value(node.right)))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand))
    raise Refused(type(node).__name__)


def _bounded(x):
    """x, if it is a finite number of at most MAX_DIGITS digits (so chained products stay cheap)."""
    if isinstance(x, float) and not math.isfinite(x):
        raise Refused("not finite")
    if abs(x) >= 10 ** MAX_DIGITS:
        raise Refused("too large")
    return x
