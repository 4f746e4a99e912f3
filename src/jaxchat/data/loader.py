"""
Batches as a pure function of (seed, step): resuming a run needs only the step.

The rows of a packed split are visited epoch by epoch, each epoch in its own random order:
    g     = step * batch_size + j          (global position of the j-th row of the batch)
    epoch = g // num_rows
    row   = permutation(seed, epoch)[g % num_rows]
where permutation(seed, epoch) = np.random.default_rng([seed, epoch]).permutation(num_rows). So every row is
seen exactly once per epoch, a batch may straddle two epochs, and nothing depends on what ran before.
The permutations of the last few epochs asked for are cached.

Shapes: rows (N, T+1) int32 -> inputs (B, T) = rows[:, :-1], targets (B, T) = rows[:, 1:].
"""

from __future__ import annotations

import functools
from typing import Iterator

import numpy as np


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, num_rows: int) -> np.ndarray:
    """The order of the rows in one epoch (read-only, cached)."""
    perm = np.random.default_rng([seed, epoch]).permutation(num_rows)
    perm.setflags(write=False)
    return perm


def batch_indices(step: int, batch_size: int, num_rows: int, seed: int) -> np.ndarray:
    """Row indices (batch_size,) of the global batch at `step`."""
    if num_rows <= 0:
        raise ValueError(f"num_rows={num_rows}: the split has no rows; use a shorter sequence_len or more data")
    if step < 0 or batch_size <= 0:
        raise ValueError(f"step={step} must be >= 0 and batch_size={batch_size} must be > 0")
    if seed < 0:
        raise ValueError(f"seed={seed} must be >= 0 (numpy seeds are non-negative)")
    g = step * batch_size + np.arange(batch_size, dtype=np.int64)
    epochs = g // num_rows
    out = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):  # one epoch, or two (rarely more, if batch_size > num_rows)
        mask = epochs == epoch
        out[mask] = epoch_permutation(seed, int(epoch), num_rows)[g[mask] % num_rows]
    return out


def split_row(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, T+1) rows -> (inputs, targets), both (B, T) int32 and contiguous."""
    batch = np.asarray(batch, dtype=np.int32)
    return np.ascontiguousarray(batch[:, :-1]), np.ascontiguousarray(batch[:, 1:])


def get_batch(rows: np.ndarray, step: int, batch_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) int32 (B, T) of the global batch at `step`. `rows` may be a read-only memmap."""
    idx = batch_indices(step, batch_size, rows.shape[0], seed)
    return split_row(rows[idx])


def num_eval_batches(num_rows: int, row_len: int, batch_size: int, max_tokens: int = 0) -> int:
    """How many full batches `iter_eval_batches` yields: all rows, capped at max_tokens input tokens if > 0."""
    n = num_rows // batch_size
    if max_tokens > 0:
        n = min(n, max_tokens // (batch_size * (row_len - 1)))
    return n


def iter_eval_batches(rows: np.ndarray, batch_size: int, max_tokens: int = 0
                      ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Sequential, unshuffled (inputs, targets) batches of `rows`, B*T tokens each, at most max_tokens tokens
    in all (0 = every full batch). Only full batches are yielded, so every batch has the same shape (one
    compile). Raises at once, saying what to change, if not even one batch can be formed."""
    n = num_eval_batches(rows.shape[0], rows.shape[1], batch_size, max_tokens)
    if n == 0:
        raise ValueError(f"cannot form one eval batch: {rows.shape[0]} rows of {rows.shape[1] - 1} tokens, "
                         f"batch_size={batch_size}, max_tokens={max_tokens}; lower the eval batch size or "
                         f"raise max_tokens")
    return (split_row(rows[i * batch_size:(i + 1) * batch_size]) for i in range(n))
