"""Sliding-window evaluation, as parameter golf scores a model (PR #334's `eval_val_sliding`, SPEC_SPEEDRUN §4).

Over a token stream of n + 1 tokens (n targets), windows of `context` tokens start every `stride` tokens while they
fit (0, stride, 2 stride, ...), and when the last of them stops short of the end one more window is aligned to
the end (start n - context). The first window scores all its targets; every later window scores only its last
`stride` targets, so each target is predicted with at least context - stride tokens before it instead of
0..context-1 in non-overlapping chunks.

`tail="reference"` (the default) is the reference exactly: its end-aligned window also scores its last `stride`
targets, so when (n - context) is not a multiple of stride, the stride - (n - context) % stride targets before the
previous window's end are scored twice (the fixture's stream: 4 of 300 targets; golf's 62M-token val: at most 63). `tail="once"` scores only the
targets no window has scored yet, so every target counts exactly once. Both agree whenever (n - context) is a
multiple of stride (golf's own val set at 1024/64 is such a stream up to its last window).

Implementation: every window is a row (inputs, targets) of the same shape, the targets it does not score set to
-1 (the head ignores them, model/head.py), so the whole evaluation is the ordinary eval step (evaluate.py) on
batches of windows: one compiled function, batch after batch; the last batch is padded with windows that score
nothing. Windows are built batch by batch on the host, so a long stream never exists as (windows, context) at once.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from jaxchat.config import ConfigError
from jaxchat.evaluate import make_eval_step

TAILS = ("reference", "once")


def check_window(context: int, stride: int, n_targets: int | None = None) -> None:
    if not (isinstance(context, int) and context >= 1):
        raise ConfigError(f"--context {context!r} must be a positive number of tokens (e.g. the model's sequence_len)")
    if not (isinstance(stride, int) and 1 <= stride <= context):
        raise ConfigError(f"--stride {stride!r} must be between 1 and the context ({context}): each window scores its "
                          f"last `stride` targets (golf uses 64 at context 1024)")
    if n_targets is not None and n_targets < 1:
        raise ConfigError("the token stream has fewer than 2 tokens: nothing to score")


def windows(n_targets: int, context: int, stride: int, tail: str = "reference") -> list[tuple[int, int]]:
    """(start, first scored offset) of every window over a stream of n_targets + 1 tokens. A window's inputs are
    stream[start : start + context], its targets stream[start + 1 : start + context + 1], and it scores targets
    offset..context-1 (fewer than context only when the whole stream is shorter than one window)."""
    check_window(context, stride, n_targets)
    if tail not in TAILS:
        raise ConfigError(f"sliding tail {tail!r}: choose one of {', '.join(TAILS)}")
    if n_targets <= context:  # one window holds everything: score it all
        return [(0, 0)]
    starts = list(range(0, n_targets - context + 1, stride))
    out = [(ws, 0 if ws == 0 else context - stride) for ws in starts]
    if starts[-1] + context < n_targets:  # one more window, aligned to the end
        last = n_targets - context
        scored_to = starts[-1] + context  # targets [0, scored_to) are scored already
        out.append((last, context - stride if tail == "reference" else scored_to - last))
    return out


def window_batch(stream: np.ndarray, wins: list[tuple[int, int]], context: int, batch: int):
    """(inputs, targets) int32 (batch, context) for `wins` (at most `batch` of them); unscored targets and the
    padding rows are -1."""
    x = np.zeros((batch, context), np.int32)
    y = np.full((batch, context), -1, np.int32)
    n = len(stream) - 1
    for i, (ws, first) in enumerate(wins):
        end = min(ws + context, n)
        x[i, :end - ws] = stream[ws:end]
        y[i, first:end - ws] = stream[ws + 1 + first:end + 1]
    return x, y


def score_windows(eval_step, params, stream: np.ndarray, wins: list[tuple[int, int]], context: int,
                  batch_size: int, tot: dict | None = None) -> dict:
    """Sum the eval step's totals (nll, tokens, nll_bytes, bytes) over `wins`, in batches of `batch_size` windows
    (the last batch padded with windows that score nothing, so one compiled shape serves every batch)."""
    tot = tot if tot is not None else {"nll": 0.0, "tokens": 0, "nll_bytes": 0.0, "bytes": 0}
    for i in range(0, len(wins), batch_size):
        x, y = window_batch(stream, wins[i:i + batch_size], context, batch_size)
        out = jax.device_get(eval_step(params, x, y))
        for k in tot:
            tot[k] += float(out[k])
    return tot


def summarize(tot: dict) -> dict:
    return {"val_loss": tot["nll"] / max(tot["tokens"], 1),
            "val_bpb": tot["nll_bytes"] / (math.log(2) * max(tot["bytes"], 1)),
            "val_tokens": int(tot["tokens"]), "val_bytes": int(tot["bytes"])}


def sliding_eval(eval_step, params, stream, context: int, stride: int, batch_size: int = 32,
                 tail: str = "reference") -> dict:
    """Sliding-window val loss (mean NLL, nats/token) and bpb of `params` on a 1-D token `stream`, with the eval
    step of evaluate.make_eval_step (so bytes are counted by the same rule as a plain evaluation). Also returns the
    number of windows and the targets scored."""
    stream = np.asarray(stream).reshape(-1)
    wins = windows(len(stream) - 1, context, stride, tail)
    tot = score_windows(eval_step, params, stream, wins, context, batch_size)
    return {**summarize(tot), "windows": len(wins), "context": context, "stride": stride}


def val_stream(rows: np.ndarray, max_tokens: int = 0) -> np.ndarray:
    """The validation rows (N, T+1) laid end to end as one stream (each row starts with BOS, so this is the val
    documents in row order with BOS between them, like golf's val stream), cut to max_tokens + 1 tokens (0: all)."""
    s = np.asarray(rows, np.int32).reshape(-1)
    return s[:max_tokens + 1] if max_tokens > 0 else s


def eval_run_sliding(fns, params, byte_rule, rows: np.ndarray, max_tokens: int, context: int,
                     stride: int, batch_size: int = 32, tail: str = "reference") -> tuple[dict, dict]:
    """(sliding, chunks) on the first max_tokens targets of the val stream: the sliding-window score and, on the
    same targets, the plain score of non-overlapping windows of `context` (stride = context), for comparison."""
    check_window(context, stride)
    stream = val_stream(rows, max_tokens)
    step = make_eval_step(fns, byte_rule)
    return (sliding_eval(step, params, stream, context, stride, batch_size, tail),
            sliding_eval(step, params, stream, context, context, batch_size, tail))
