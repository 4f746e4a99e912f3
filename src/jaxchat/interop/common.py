"""Building a jaxchat GPT from someone else's tensors, checking every name and shape on the way."""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxchat.config import ModelConfig
from jaxchat.model.gpt import GPT, assign


class InteropError(ValueError):
    """The given tensors do not fit the given config; the message lists what did not match."""


def path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def model_from_lookup(cfg: ModelConfig, lookup: Callable[[tuple], np.ndarray | None], source: str,
                      unused: Callable[[], list[str]] | None = None) -> GPT:
    """Build GPT(cfg) whose every parameter comes from `lookup(path)` (already in our (in, out) layout).

    `lookup` returns None for a tensor the source does not have. Missing tensors and shape mismatches are
    collected and reported together, naming the source's tensors, so a wrong depth or MLP kind is obvious.
    """
    abstract = nnx.eval_shape(lambda: GPT(cfg))
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    problems, leaves = [], []
    for path, var in flat:
        arr = lookup(path)
        if arr is None:
            problems.append(f"missing {path_str(path)} {tuple(var.shape)}")
            leaves.append(None)
            continue
        arr = np.asarray(arr)
        if arr.shape != tuple(var.shape):
            problems.append(f"shape of {path_str(path)}: {source} has {arr.shape}, config needs {tuple(var.shape)}")
        leaves.append(arr)
    extra = unused() if unused is not None else []
    if extra:
        problems.append(f"{source} tensors the config has no place for: {', '.join(sorted(extra)[:12])}"
                        + (" ..." if len(extra) > 12 else ""))
    if problems:
        raise InteropError(
            f"{source} does not match the model config (n_layer={cfg.n_layer}, n_embd={cfg.n_embd}, "
            f"n_head={cfg.n_head}, n_kv_head={cfg.n_kv_head}, mlp={cfg.mlp}, "
            f"tie_embeddings={cfg.tie_embeddings}):\n  " + "\n  ".join(problems[:20])
            + "\nFix: pass the config the checkpoint was trained with (depth, widths, MLP kind, tying).")
    for (path, var), arr in zip(flat, leaves):
        assign(var, jnp.asarray(arr, jnp.float32))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
