"""KV-cache generation: one prefill over the prompt, then one jitted decode step per token.

The cache holds, per layer, keys and values (B, max_len, K, D), the write cursor `pos`, and the previous
token's normed embedding `prev_x` that smear mixes into the next token. Temperature 0 is greedy decoding;
otherwise logits / temperature are sampled after keeping the top-k (top_k <= 0 keeps all).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _pick(logits, key, temperature: float, top_k: int):
    if temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


class Sampler:
    """Compiled prefill and decode functions for one model structure (reused across prompts)."""

    def __init__(self, fns):
        self.fns = fns

        @jax.jit
        def forward(params, idx, cache):
            return fns.module(params)(idx, cache=cache)

        self.forward = forward

    def generate(self, params, prompt: list[int], max_tokens: int, temperature: float = 1.0, top_k: int = 0,
                 seed: int = 0, stop_ids: tuple[int, ...] = ()) -> list[int]:
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token (e.g. the BOS token)")
        model = self.fns.module(params)
        cache = model.init_cache(1, len(prompt) + max_tokens)
        logits, cache = self.forward(params, jnp.asarray([prompt], jnp.int32), cache)
        key = jax.random.PRNGKey(seed)
        out: list[int] = []
        for _ in range(max_tokens):
            key, sub = jax.random.split(key)
            tok = _pick(logits[:, -1], sub, temperature, top_k)
            t = int(np.asarray(tok)[0])
            out.append(t)
            if t in stop_ids or len(out) == max_tokens:
                break
            logits, cache = self.forward(params, tok[:, None], cache)
        return out
