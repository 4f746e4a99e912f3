"""The decode engine: batched generation in one compiled loop, with nanochat's calculator tool.

`Engine.generate` / `Engine.stream` turn one prompt into `num_samples` continuations:
1. prefill: ONE model call over the prompt (batch 1), then the KV cache is repeated to the batch;
2. decode: a `lax.while_loop` that, per step, picks each row's next token (greedy at temperature 0, else a
   sample after temperature, top-k, then top-p), writes it to an output buffer and feeds it back through the
   KV cache; rows stop at a stop token, the loop at `max_tokens` or when every row has stopped.
Python sees the device only when the loop exits: at the end, after `chunk` tokens when streaming, or when a
row has written <|python_end|> (a tool call): Python then evaluates the call with the calculator (tools.py),
queues <|output_start|> result <|output_end|> as that row's forced next tokens, and re-enters the loop, which
takes forced tokens before sampled ones (nanochat's Engine does the same per token, in Python).

Shapes are bucketed so a chat compiles a few programs, not one per turn: the prompt is right-padded to a power
of two and the KV cache is sized to a power of two (capped at the model's context). Padding on the right is
exact: the prompt minus its last token is prefilled with pad copies of its second-to-last token, the cache's
write cursor `pos` is moved back to the prompt's last position (so the pads' keys are overwritten before any
query can see them: attention is causal), and the last token is fed as the first decode step; the smear input
carried in the cache is then the true previous token's, because the pads repeat it.

The model is used only through its public interface (as sample.py): `fns.module(params)(idx, cache=cache)`
-> (logits, cache) and `init_cache(batch, max_len)`, whose dict carries the write cursor `pos`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from jaxchat.chat.conversation import Specials
from jaxchat.chat.tools import calculate
from jaxchat.config import ConfigError

FORCE_CAP = 64  # forced tokens one tool result may queue (a calculator result is at most ~55 tokens)
MIN_BUCKET = 16  # smallest prompt/cache length compiled


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: temperature 0 is greedy; top_k <= 0 keeps all (a new top_k compiles the
    loop again, temperature and top_p do not); top_p 1 keeps all."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise ConfigError(f"temperature {self.temperature} must be a finite number >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p {self.top_p} must be in (0, 1] (1 keeps every token)")


@dataclass
class Generation:
    """The result of `Engine.generate`: per row, the new tokens (without the stop token) and why it ended
    ("stop": a stop token, "length": max_tokens or the context); `logits` (rows, steps, V) if recorded."""

    tokens: list[list[int]]
    finish: list[str]
    logits: np.ndarray | None = field(default=None, repr=False)


def _bucket(n: int) -> int:
    return max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length())


def pick(logits, key, temperature, top_k: int, top_p):
    """Next token per row (B,) from fp32 logits (B, V). Temperature and top_p are traced scalars (changing them
    never recompiles); top_k is static, so the top-k candidates come from `lax.top_k` rather than a sort of the
    whole vocabulary (a full sort happens only for top-p without top-k). Top-k, then top-p on the renormalised
    top-k distribution, then a categorical draw among the survivors."""

    def greedy():
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sample():
        scaled = logits / temperature
        if top_k > 0:  # candidates: the k best, already in descending order
            vals, idx = jax.lax.top_k(scaled, min(top_k, scaled.shape[-1]))
        else:
            vals, idx = scaled, None

        def nucleus():
            order = jnp.argsort(-vals, axis=-1) if idx is None else None
            srt = vals if order is None else jnp.take_along_axis(vals, order, axis=-1)
            probs = jax.nn.softmax(srt, axis=-1)
            before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens: < top_p keeps
            choice = jax.random.categorical(key, jnp.where(before < top_p, srt, -jnp.inf), axis=-1)
            return choice if order is None else jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]

        choice = jax.lax.cond(top_p < 1, nucleus, lambda: jax.random.categorical(key, vals, axis=-1))
        tokens = choice if idx is None else jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0]
        return tokens.astype(jnp.int32)

    return jax.lax.cond(temperature > 0, sample, greedy)


class Engine:
    """Compiled prefill and decode loop for one model and its parameters (reused across prompts)."""

    def __init__(self, fns, params, tokenizer=None, context: int | None = None):
        self.fns, self.params, self.tok = fns, params, tokenizer
        self.context = context or fns.cfg.model.sequence_len
        has_specials = tokenizer is not None and tokenizer.token_to_id("<|python_end|>") is not None
        self.specials = Specials.of(tokenizer) if has_specials else None
        self._start = jax.jit(self._start_fn, static_argnames=("batch", "cache_len", "record"))
        self._run = jax.jit(self._run_fn, donate_argnums=(1,), static_argnames=("top_k",))

    # ----------------------------------------------------------------------------------------------------
    # the two compiled functions

    def _start_fn(self, params, padded, last, n, controls, stop_ids, seed, *, batch, cache_len, record):
        """Prefill padded (1, P), feed the prompt's last token, and build the decode state for `batch` rows."""
        model = self.fns.module(params)
        _, cache = model(padded, cache=model.init_cache(1, cache_len))
        cache = {**cache, "pos": (n - 1).astype(jnp.int32)}  # rewind over the pads (module docstring)
        logits, cache = model(last.reshape(1, 1), cache=cache)
        axes = self._batch_axes(model, cache_len)
        cache = jax.tree.map(lambda a, ax: a if ax is None else jnp.repeat(a, batch, axis=ax), cache, axes)
        state = {
            "cache": cache,
            "logits": jnp.repeat(logits[:, -1], batch, axis=0),
            "i": jnp.int32(0),
            "out": jnp.zeros((batch, cache_len), jnp.int32),
            "done": jnp.zeros((batch,), bool),
            "wait": jnp.zeros((batch,), bool),
            "forced": jnp.zeros((batch, FORCE_CAP), jnp.int32),
            "f_len": jnp.zeros((batch,), jnp.int32),
            "f_idx": jnp.zeros((batch,), jnp.int32),
            "key": jax.random.PRNGKey(seed),
            "controls": controls,
            "stop_ids": stop_ids,
        }
        if record:
            state["record"] = jnp.zeros((batch, cache_len, logits.shape[-1]), jnp.float32)
        return state

    @staticmethod
    def _batch_axes(model, cache_len):
        """Per cache leaf, the axis that grows with the batch (None for shared leaves such as `pos`), read off
        the shapes of a 1-row and a 2-row cache, so no cache layout is assumed."""
        one, two = (jax.eval_shape(lambda b=b: model.init_cache(b, cache_len)) for b in (1, 2))

        def axis(a, b):
            return next((i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y), None)

        return jax.tree.map(axis, one, two)

    def _run_fn(self, params, state, until, top_k):
        """Decode until step `until`, every row stopped, or a row waiting for its tool call."""
        model = self.fns.module(params)
        python_end = -1 if self.specials is None else self.specials.python_end
        temperature, top_p = state["controls"]
        rows = jnp.arange(state["out"].shape[0])

        def cond(s):
            return (s["i"] < until) & ~jnp.all(s["done"]) & ~jnp.any(s["wait"])

        def body(s):
            s = dict(s)
            sampled = pick(s["logits"], jax.random.fold_in(s["key"], s["i"]), temperature, top_k, top_p)
            forced = s["f_idx"] < s["f_len"]
            tok = jnp.where(forced, s["forced"][rows, jnp.minimum(s["f_idx"], FORCE_CAP - 1)], sampled)
            if "record" in s:
                s["record"] = s["record"].at[:, s["i"]].set(s["logits"])
            s["out"] = s["out"].at[:, s["i"]].set(tok)
            s["f_idx"] = s["f_idx"] + forced
            s["wait"] = ~s["done"] & (tok == python_end)
            s["done"] = s["done"] | jnp.any(tok[:, None] == s["stop_ids"][None, :], axis=-1)
            logits, s["cache"] = model(tok[:, None], cache=s["cache"])
            s["logits"] = logits[:, -1]
            s["i"] = s["i"] + 1
            return s

        return jax.lax.while_loop(cond, body, state)

    # ----------------------------------------------------------------------------------------------------
    # Python side

    def stream(self, prompt: list[int], num_samples: int = 1, max_tokens: int = 256, sampling: Sampling = Sampling(),
               seed: int = 0, stop_ids=(), chunk: int | None = 8, record: bool = False):
        """Yield, each time the loop returns, every row's new tokens (a list per row, stop tokens left out);
        chunk=None runs to the end in one call. The last item is the finished `Generation`."""
        n = len(prompt)
        if n == 0:
            raise ConfigError("the prompt is empty: give at least one token (e.g. the BOS token)")
        if n >= self.context:
            raise ConfigError(f"the prompt is {n} tokens and fills the model's context of {self.context}: "
                              f"shorten it (or /clear the chat)")
        if num_samples < 1 or max_tokens < 1:
            raise ConfigError("num_samples and max_tokens must be >= 1")
        max_new = min(max_tokens, self.context - n)
        cache_len = min(self.context, _bucket(n + max_new))
        pad = prompt[max(n - 2, 0)]
        padded = list(prompt[:n - 1]) + [pad] * (min(_bucket(n - 1), cache_len) - (n - 1))
        controls = jnp.asarray([sampling.temperature, sampling.top_p], jnp.float32)
        stops = jnp.asarray(list(stop_ids) or [-1], jnp.int32)
        state = self._start(self.params, jnp.asarray([padded], jnp.int32), jnp.int32(prompt[-1]), jnp.int32(n),
                            controls, stops, seed, batch=num_samples, cache_len=cache_len, record=record)
        tokens = [[] for _ in range(num_samples)]
        finish = ["length"] * num_samples
        seen = 0
        while True:
            until = max_new if chunk is None else min(seen + chunk, max_new)
            state = self._run(self.params, state, jnp.int32(until), top_k=max(sampling.top_k, 0))
            i, out, wait = jax.device_get((state["i"], state["out"], state["wait"]))
            new = [[] for _ in range(num_samples)]
            for r in range(num_samples):
                for t in out[r, seen:i].tolist():
                    if finish[r] == "stop":
                        break
                    if t in stop_ids:
                        finish[r] = "stop"
                    else:
                        new[r].append(t)
                tokens[r] += new[r]
            seen = int(i)
            yield new
            if seen >= max_new or all(f == "stop" for f in finish):
                break
            if wait.any():
                state = self._serve_tools(state, out, seen, wait)
        logits = np.asarray(state["record"][:, :seen]) if record else None
        yield Generation(tokens, finish, logits)

    def generate(self, prompt: list[int], num_samples: int = 1, max_tokens: int = 256,
                 sampling: Sampling = Sampling(), seed: int = 0, stop_ids=(), record: bool = False) -> Generation:
        """Generate to the end in one compiled call (more only if the model calls a tool)."""
        *_, result = self.stream(prompt, num_samples, max_tokens, sampling, seed, stop_ids, chunk=None,
                                 record=record)
        return result

    def _serve_tools(self, state, out, i, wait):
        """Evaluate each waiting row's <|python_start|> expr <|python_end|> and queue its output tokens."""
        sp = self.specials
        forced, f_len, f_idx = (np.array(state[k]) for k in ("forced", "f_len", "f_idx"))
        for r in np.flatnonzero(wait):
            row = out[r, :i].tolist()  # ends with <|python_end|>
            start = max((j for j, t in enumerate(row) if t == sp.python_start), default=None)
            if start is None or start == i - 2:
                continue  # no open call, or an empty one: nothing to run (as nanochat)
            result = calculate(self.tok.decode(row[start + 1:-1]))
            queued = [] if result is None else [sp.output_start, *self.tok.encode(result), sp.output_end]
            if len(queued) > FORCE_CAP:
                continue
            forced[r, :len(queued)], f_len[r], f_idx[r] = queued, len(queued), 0
        return {**state, "forced": jnp.asarray(forced), "f_len": jnp.asarray(f_len), "f_idx": jnp.asarray(f_idx),
                "wait": jnp.zeros_like(state["wait"])}
