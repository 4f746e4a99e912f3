"""
Batches as a pure function of (seed, step): resuming a run needs only the step.

The rows of a packed split are visited epoch by epoch, each epoch in its own random order:
    g     = step * batch_size + j          (global position of the j-th row of the batch)
    epoch = g // num_rows
    row   = permutation(seed, epoch)[g % num_rows]
where permutation(seed, epoch) = np.random.default_rng([seed, epoch]).permutation(num_rows). So every row is
seen exactly once per epoch, a batch may straddle two epochs, and nothing depends on what ran before.
The permutations of the last few epochs asked for are cached.

Shapes: rows (N, T+1) int32 (or the uint16/uint32 memmap of a prepared dataset) -> inputs (B, T) =
rows[:, :-1], targets (B, T) = rows[:, 1:], both int32.
A loss mask travels in the rows themselves: an entry e < 0 is the token ~e (= -e - 1), read as an input but
never a target (its target is -1, which the loss ignores). Pretraining rows have none; `jaxchat sft` rows
(chat/sft.py) mark every token but the assistant's this way, so the same loop and evaluation train on them.

Multi-host: each process reads only the rows of the global batch its devices hold (`positions`, from the
batch sharding: distributed.py), so the processes' parts of a step are disjoint and together are the global
batch, whatever the number of processes.
`Prefetcher` computes the next batches on a background thread.
"""

from __future__ import annotations

import functools
import queue
import threading
from typing import Callable, Iterator

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
    """(B, T+1) rows -> (inputs, targets), both (B, T) int32 and contiguous; a masked entry ~t (module
    docstring) is the input t and the target -1."""
    batch = np.asarray(batch, dtype=np.int32)
    if batch.size and batch.min() < 0:
        tokens = np.where(batch < 0, ~batch, batch)
        targets = np.where(batch[:, 1:] < 0, -1, batch[:, 1:])
        return np.ascontiguousarray(tokens[:, :-1]), np.ascontiguousarray(targets)
    return np.ascontiguousarray(batch[:, :-1]), np.ascontiguousarray(batch[:, 1:])


def get_batch(rows: np.ndarray, step: int, batch_size: int, seed: int,
              positions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) int32 of the batch at `step`: the whole global batch (B, T), or only its rows at
    `positions` (indices into the global batch, e.g. the rows one process's devices hold: distributed.py).
    `rows` may be a read-only memmap."""
    idx = batch_indices(step, batch_size, rows.shape[0], seed)
    if positions is not None:
        positions = np.asarray(positions)
        if positions.size and (positions.min() < 0 or positions.max() >= batch_size):
            raise ValueError(f"positions must index the global batch of {batch_size} rows, got "
                             f"{positions.min()}..{positions.max()}")
        idx = idx[positions]
    order = np.argsort(idx, kind="stable")  # read the memmap in file order, then put the rows back
    batch = np.empty((idx.size, rows.shape[1]), dtype=rows.dtype)
    batch[order] = rows[idx[order]]
    return split_row(batch)


def put_unless_stopped(q: queue.Queue, item, stop: threading.Event, poll: float = 0.05) -> bool:
    """Put `item` on a bounded queue from a producer thread, giving up once `stop` is set (the consumer went
    away, so a full queue would block the thread for good). Returns whether the item was put."""
    while not stop.is_set():
        try:
            q.put(item, timeout=poll)
            return True
        except queue.Full:
            pass
    return False

class Prefetcher:
    """Computes `fn(step)` for the steps after the one last asked for, `depth` ahead, on a background thread.

        with Prefetcher(lambda s: get_batch(rows, s, B, seed), start_step) as batches:
            for step in range(start_step, num_steps):
                x, y = batches.get(step)

    Because a batch is a pure function of the step, asking for any other step than the next one just restarts
    the thread there; the result is always fn(step). An exception in fn is re-raised by `get`."""

    def __init__(self, fn: Callable[[int], object], start_step: int = 0, depth: int = 2):
        if depth < 1:
            raise ValueError(f"depth={depth} must be >= 1")
        self.fn, self.depth = fn, depth
        self._thread = None
        self._start(start_step)

    def _start(self, step: int) -> None:
        self._next = step
        self._queue: queue.Queue = queue.Queue(maxsize=self.depth)
        self._stop = threading.Event()
        q, stop = self._queue, self._stop

        def work():
            s = step
            while not stop.is_set():
                try:
                    item = (s, self.fn(s), None)
                except BaseException as e:  # handed to get()
                    item = (s, None, e)
                put_unless_stopped(q, item, stop)
                if item[2] is not None:
                    return
                s += 1

        self._thread = threading.Thread(target=work, daemon=True, name="jaxchat-prefetch")
        self._thread.start()

    def get(self, step: int):
        if step != self._next:
            self.close()
            self._start(step)
        s, value, err = self._queue.get()
        assert s == step, (s, step)
        self._next = step + 1
        if err is not None:
            self.close()
            self._thread = None
            self._next = None  # the next get restarts the thread
            raise err
        return value

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


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
