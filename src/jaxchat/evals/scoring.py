"""Batched scoring of token sequences with a run's full forward: what CORE, the chat multiple-choice evals and the
lm-evaluation-harness model ask of the model.

`Scorer.token_scores(seqs)` gives, per sequence of n tokens, the log-probability of each token given the ones
before it and the model's argmax prediction there (both length n - 1: entry t is about token t + 1).
`Scorer.logits_at(seqs, positions)` gives the fp32 logits at one position per sequence.

`token_scores` feeds the model all tokens but the last (whose prediction no one reads), so a sequence may hold
context + 1 tokens, as in lm-evaluation-harness's rolling windows.

Sequences are sorted by length and scored `batch_size` at a time, right-padded with `pad_id` to a power of two
(at least 16, at most the context), so a whole evaluation compiles a handful of programs. Right padding is exact:
attention is causal, so the pads never reach the positions that are read. Shape legend: B batch, T time, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxchat.config import ConfigError

MIN_BUCKET = 16


def _bucket(n: int, cap: int) -> int:
    return min(cap, max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length()))


class Scorer:
    """Compiled forward passes over padded batches for one model and its parameters."""

    def __init__(self, fns, params, pad_id: int, batch_size: int = 8, context: int | None = None):
        if batch_size < 1:
            raise ConfigError(f"batch size {batch_size} must be >= 1")
        self.fns, self.params, self.pad_id, self.batch_size = fns, params, pad_id, batch_size
        self.context = context or fns.cfg.model.sequence_len
        self._scores = jax.jit(self._scores_fn)
        self._at = jax.jit(self._at_fn)

    def _scores_fn(self, params, ids):  # ids (B, T+1): inputs ids[:, :-1], targets ids[:, 1:]
        logits = self.fns.module(params)(ids[:, :-1]).astype(jnp.float32)  # (B, T, V)
        logp = jax.nn.log_softmax(logits, axis=-1)
        target = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]  # (B, T)
        return target, jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def _at_fn(self, params, ids, pos):
        logits = self.fns.module(params)(ids).astype(jnp.float32)  # (B, T, V)
        return jnp.take_along_axis(logits, pos[:, None, None], axis=1)[:, 0]  # (B, V)

    def _batches(self, seqs, extra: int):
        """(indices, padded ids (B, T + extra)) over `seqs`, longest first, every batch exactly batch_size rows;
        the model reads T of them."""
        for i, s in enumerate(seqs):
            if len(s) <= extra:
                raise ConfigError(f"sequence {i} has {len(s)} tokens: it needs more than {extra}")
            if len(s) - extra > self.context:
                raise ConfigError(f"a sequence of {len(s)} tokens exceeds the model's context of {self.context}: "
                                  f"crop it first")
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        for b in range(0, len(order), self.batch_size):
            idx = order[b:b + self.batch_size]
            width = _bucket(max(len(seqs[i]) for i in idx) - extra, self.context) + extra
            ids = np.full((self.batch_size, width), self.pad_id, np.int32)
            for r, i in enumerate(idx):
                ids[r, :len(seqs[i])] = seqs[i]
            yield idx, ids

    def token_scores(self, seqs: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per sequence of n <= context + 1 tokens: (log p(token t+1 | tokens <= t), argmax prediction at t) for
        t = 0..n-2."""
        out: list = [None] * len(seqs)
        for idx, ids in self._batches(seqs, 1):
            logp, greedy = jax.device_get(self._scores(self.params, jnp.asarray(ids)))
            for r, i in enumerate(idx):
                n = len(seqs[i])
                out[i] = (np.asarray(logp[r, :n - 1], np.float64), np.asarray(greedy[r, :n - 1]))
        return out

    def logits_at(self, seqs: list[list[int]], positions: list[int]) -> np.ndarray:
        """fp32 logits (len(seqs), V) at `positions[i]` of sequence i (the prediction of the token after it)."""
        out: list = [None] * len(seqs)
        for idx, ids in self._batches(seqs, 0):
            pos = np.zeros(self.batch_size, np.int32)
            pos[:len(idx)] = [positions[i] for i in idx]
            logits = np.asarray(jax.device_get(self._at(self.params, jnp.asarray(ids), jnp.asarray(pos))))
            for r, i in enumerate(idx):
                out[i] = logits[r]
        return np.stack(out) if out else np.zeros((0, 0), np.float32)
