"""Test-time training (SPEC_SPEEDRUN §4): the model keeps training on the validation stream while it is scored.

Score-first (`score_first_ttt`, the leaderboard's legal form): the stream's targets are split into chunks of
`chunk_tokens` (golf: 32,768). For each chunk in order, first every sliding window whose scored targets start in
the chunk is scored with the current params (no gradient), then the params train on the chunk's tokens:
`epochs` passes over it in sequences of `seq_len` (+1) tokens, `batch_size` sequences per step, SGD with momentum
(PyTorch's: buf = momentum * buf + g; p -= lr * buf), the gradient clipped to a global norm of `grad_clip`, the lr
following a cosine across chunks (lr * (1 + cos(pi * c / (chunks - 1))) / 2 for chunk c). The last chunk is never
trained on (nothing is scored after it). So no target is ever scored by params that have seen it.

Full TTT (`full_ttt`, PR #334's `run_ttt_sgd`): `epochs` passes over the whole stream in non-overlapping sequences
of `seq_len`, batch 1, SGD with momentum, BEFORE scoring it. The model is scored on tokens it trained on: NOT
leaderboard-legal, and every result from it says so (`legal: False`).

In both, the first `freeze_blocks` blocks (their per-layer entries in stacked tensors such as resid_mix too) and
the embeddings (token embedding, value embeddings, BigramHash, smear gates) are frozen, as the reference freezes
tok_emb, bigram and smear; the rest trains. Both return the sliding-window score before any training and after.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from jaxchat.config import ConfigError
from jaxchat.dtypes import F32
from jaxchat.evaluate import make_eval_step
from jaxchat.golf.sliding import check_window, score_windows, summarize, val_stream, windows
from jaxchat.train import global_norm

FROZEN_TOP = ("wte", "value_embeds", "bigram", "smear_v1_gate", "smear_gate", "smear_lambda")  # embeddings, smear
PER_LAYER = ("resid_mix", "resid_lambdas", "x0_lambdas")  # (n_layer, ...) tensors: row i belongs to block i


@dataclass(frozen=True)
class TTTConfig:
    lr: float = 0.002
    momentum: float = 0.9
    epochs: int = 3
    chunk_tokens: int = 32768  # score-first only
    grad_clip: float = 1.0  # score-first (golf's legal recipe); full TTT's reference does not clip: pass 0
    freeze_blocks: int = 2
    batch_size: int = 32  # sequences per SGD step (full TTT's reference: 1)

    def check(self, n_layer: int, stride: int, chunked: bool = True) -> None:
        bad = [(k, v, why) for k, v, why in [
            ("lr", self.lr, "> 0"), ("momentum", self.momentum, "in [0, 1)"), ("epochs", self.epochs, ">= 1"),
            ("chunk_tokens", self.chunk_tokens, f"a positive multiple of the stride ({stride})"),
            ("grad_clip", self.grad_clip, ">= 0 (0: no clipping)"),
            ("freeze_blocks", self.freeze_blocks, f"in [0, {n_layer}]"), ("batch_size", self.batch_size, ">= 1")]
            if not {"lr": self.lr > 0 and math.isfinite(self.lr), "momentum": 0 <= self.momentum < 1,
                    "epochs": self.epochs >= 1, "grad_clip": self.grad_clip >= 0,
                    "chunk_tokens": not chunked or (self.chunk_tokens > 0 and self.chunk_tokens % stride == 0),
                    "freeze_blocks": 0 <= self.freeze_blocks <= n_layer, "batch_size": self.batch_size >= 1}[k]]
        if bad:
            flag = {"chunk_tokens": "chunk", "batch_size": "batch"}  # (the other fields are named as their flags)
            raise ConfigError("; ".join(f"--ttt-{flag.get(k, k).replace('_', '-')} {v!r} must be {why}"
                                        for k, v, why in bad))


def trainable_mask(params, n_layer: int, freeze_blocks: int):
    """A tree like `params` of 1.0 (trains) and 0.0 (frozen) arrays broadcastable to each leaf."""
    def mask(path, leaf):
        keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
        top = str(keys[0])
        if top in FROZEN_TOP:
            return jnp.zeros((), F32)
        if top == "blocks":
            return jnp.asarray(0.0 if int(keys[1]) < freeze_blocks else 1.0, F32)
        if top in PER_LAYER and leaf.ndim >= 1 and leaf.shape[0] == n_layer:
            rows = (jnp.arange(n_layer) >= freeze_blocks).astype(F32)
            return rows.reshape((n_layer,) + (1,) * (leaf.ndim - 1))
        return jnp.ones((), F32)
    return jax.tree_util.tree_map_with_path(mask, params)


def make_sgd_step(fns, mask, momentum: float, grad_clip: float):
    """step(params, buf, x, y, lr) -> (params, buf, loss): one SGD-with-momentum update on the mean NLL of the
    targets y >= 0, frozen entries untouched (their gradient is masked before the norm and the update)."""
    def loss_fn(params, x, y):
        nll = fns.module(params)(x, targets=y)
        return jnp.sum(nll) / jnp.maximum(jnp.sum(y >= 0), 1).astype(F32)

    @jax.jit
    def step(params, buf, x, y, lr):
        loss, g = jax.value_and_grad(loss_fn)(params, x, y)
        g = jax.tree.map(lambda a, m: a * m, g, mask)
        if grad_clip > 0:
            norm = global_norm(g)
            g = jax.tree.map(lambda a: a * jnp.minimum(1.0, grad_clip / (norm + 1e-6)), g)
        buf = jax.tree.map(lambda b, a: momentum * b + a, buf, g)
        params = jax.tree.map(lambda p, b, m: p - (lr * b * m).astype(p.dtype), params, buf, mask)
        return params, buf, loss

    return step


def training_rows(tokens: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) (rows, seq_len) of consecutive non-overlapping sequences covering every target of
    `tokens` (n + 1 tokens, n targets); the last row's missing targets are -1."""
    n = len(tokens) - 1
    rows = max(1, math.ceil(n / seq_len))
    x = np.zeros((rows, seq_len), np.int32)
    y = np.full((rows, seq_len), -1, np.int32)
    for r in range(rows):
        s, e = r * seq_len, min((r + 1) * seq_len, n)
        x[r, :e - s], y[r, :e - s] = tokens[s:e], tokens[s + 1:e + 1]
    return x, y


def _train_on(step, params, buf, tokens, seq_len, batch_size, epochs, lr):
    x, y = training_rows(tokens, seq_len)
    pad = (-len(x)) % batch_size  # whole batches: one compiled shape (padding rows have no targets)
    if pad:
        x = np.concatenate([x, np.zeros((pad, seq_len), np.int32)])
        y = np.concatenate([y, np.full((pad, seq_len), -1, np.int32)])
    for _ in range(epochs):
        for i in range(0, len(x), batch_size):
            if (y[i:i + batch_size] >= 0).any():
                params, buf, _ = step(params, buf, x[i:i + batch_size], y[i:i + batch_size], F32(lr))
    return params, buf


def cosine_lr(lr: float, chunk: int, chunks: int) -> float:
    return lr * 0.5 * (1 + math.cos(math.pi * chunk / max(chunks - 1, 1)))


def score_first_ttt(fns, params, byte_rule, stream, context: int, stride: int, cfg: TTTConfig,
                    seq_len: int | None = None, eval_batch: int = 32, tail: str = "reference",
                    on_event=None) -> dict:
    """Leaderboard-legal TTT over a token stream (module docstring). `on_event(kind, chunk, params)` is called with
    ("score", c, the params that scored it) after chunk c is scored and ("train", c, the params after) once it is
    trained on (tests check the order, and rescore each chunk with the params before its training).
    Returns {"before", "after"} sliding-window scores (before: no training at all), "chunks" (per chunk: its
    score), "legal": True."""
    stream = np.asarray(stream, np.int32).reshape(-1)
    n, seq_len = len(stream) - 1, seq_len or fns.cfg.model.sequence_len
    check_window(context, stride, n)
    cfg.check(fns.cfg.model.n_layer, stride)
    eval_step = make_eval_step(fns, byte_rule)
    wins = windows(n, context, stride, tail)
    before = score_windows(eval_step, params, stream, wins, context, eval_batch)
    C = cfg.chunk_tokens
    chunks = math.ceil(n / C)
    by_chunk = [[] for _ in range(chunks)]
    for w in wins:
        by_chunk[min((w[0] + w[1]) // C, chunks - 1)].append(w)  # the chunk its first scored target is in
    mask = trainable_mask(params, fns.cfg.model.n_layer, cfg.freeze_blocks)
    step = make_sgd_step(fns, mask, cfg.momentum, cfg.grad_clip)
    buf = jax.tree.map(jnp.zeros_like, params)
    tot, per_chunk = None, []
    for c in range(chunks):
        part = score_windows(eval_step, params, stream, by_chunk[c], context, eval_batch)
        per_chunk.append(summarize(part))
        tot = part if tot is None else {k: tot[k] + part[k] for k in tot}
        if on_event:
            on_event("score", c, params)
        if c == chunks - 1:
            break  # the last chunk is never trained on
        tokens = stream[c * C:min((c + 1) * C, n) + 1]
        params, buf = _train_on(step, params, buf, tokens, seq_len, cfg.batch_size, cfg.epochs,
                                cosine_lr(cfg.lr, c, chunks))
        if on_event:
            on_event("train", c, params)
    return {"before": summarize(before), "after": summarize(tot), "chunks": per_chunk, "legal": True,
            "params": params, "windows": by_chunk}


def full_ttt(fns, params, byte_rule, stream, context: int, stride: int, cfg: TTTConfig,
             seq_len: int | None = None, eval_batch: int = 32, tail: str = "reference") -> dict:
    """PR #334's full TTT: train on the whole stream first, then score it. NOT leaderboard-legal (the score is of
    tokens the params trained on); the result says so ("legal": False)."""
    stream = np.asarray(stream, np.int32).reshape(-1)
    n, seq_len = len(stream) - 1, seq_len or fns.cfg.model.sequence_len
    check_window(context, stride, n)
    cfg.check(fns.cfg.model.n_layer, stride, chunked=False)
    eval_step = make_eval_step(fns, byte_rule)
    wins = windows(n, context, stride, tail)
    before = score_windows(eval_step, params, stream, wins, context, eval_batch)
    mask = trainable_mask(params, fns.cfg.model.n_layer, cfg.freeze_blocks)
    step = make_sgd_step(fns, mask, cfg.momentum, cfg.grad_clip)
    buf = jax.tree.map(jnp.zeros_like, params)
    usable = (n // seq_len) * seq_len  # the reference trains on n // seq_len whole sequences
    params, buf = _train_on(step, params, buf, stream[:usable + 1], seq_len, cfg.batch_size, cfg.epochs, cfg.lr)
    after = score_windows(eval_step, params, stream, wins, context, eval_batch)
    return {"before": summarize(before), "after": summarize(after), "legal": False, "params": params}


LEGAL_NOTE = {True: "score-first TTT (each chunk scored before it is trained on; leaderboard-legal)",
              False: "full TTT (trained on the whole val stream BEFORE scoring it): NOT leaderboard-legal"}


def ttt_config(args) -> TTTConfig:
    """The TTTConfig of `jaxchat eval --ttt ...`: score-first defaults to golf's legal recipe (batch 32, clip 1.0),
    full to PR #334's (batch 1, no clip)."""
    full = args.ttt == "full"
    return TTTConfig(lr=args.ttt_lr, momentum=args.ttt_momentum, epochs=args.ttt_epochs, chunk_tokens=args.ttt_chunk,
                     grad_clip=args.ttt_grad_clip if args.ttt_grad_clip is not None else (0.0 if full else 1.0),
                     freeze_blocks=args.ttt_freeze_blocks,
                     batch_size=args.ttt_batch or (1 if full else 32))


def run_ttt(mode: str, fns, params, byte_rule, rows, max_tokens: int, context: int, stride: int, cfg: TTTConfig,
            eval_batch: int = 32, tail: str = "reference") -> dict:
    """`score-first` or `full` TTT on the first max_tokens targets of the val stream (sliding.val_stream)."""
    fn = {"score-first": score_first_ttt, "full": full_ttt}[mode]
    return fn(fns, params, byte_rule, val_stream(rows, max_tokens), context, stride, cfg, eval_batch=eval_batch,
              tail=tail)
