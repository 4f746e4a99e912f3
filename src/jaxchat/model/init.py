"""Initialisation schemes other than nanochat's (whose table is `gpt.init_weights`, which calls these): parameter
golf's (docs/architecture.md §Golf), `model.init`:

- `golf` (the baseline): every Linear gets PyTorch's default U(-1/sqrt(in), 1/sqrt(in)), except the zero-init
  ones (attention and MLP output projections, an untied lm_head); wte ~ N(0, model.embed_init_std).
- `golf_ortho` (PR #334's OrthoInit): as `golf`, but a Linear with min(shape) >= 64 is orthogonal (gain 1), and
  one named `proj` (the BigramHash projection; the block projections are zero) is then scaled by 1/sqrt(2L).
  The bigram projection is zeroed in its reference constructor, so below 64 it stays zero.

Kernels here are (in, out), PyTorch's weights (out, in): "in" is the first axis, and a matrix is orthogonal in
the same sense either way (K^T K = I when in >= out, else K K^T = I).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxchat.dtypes import F32


def assign(var: nnx.Variable, value) -> None:
    """Set a Variable's value (flax 0.12 `set_value`, older flax `.value =`)."""
    if hasattr(var, "set_value"):
        var.set_value(value)
    else:
        var.value = value


def torch_default(key, shape):
    """PyTorch's nn.Linear default (kaiming_uniform with a = sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)), kernel (in, out)."""
    bound = 1.0 / math.sqrt(shape[0])
    return jax.random.uniform(key, shape, F32, -bound, bound)


def golf_init(model, rngs: nnx.Rngs, ortho: bool) -> None:
    """Overwrite wte, lm_head, every block Linear and the bigram projection with golf's init (`ortho`: PR #334's)."""
    cfg = model.config
    scale_proj = 1.0 / math.sqrt(2 * cfg.n_layer)

    def linear(var, zero: bool = False, proj: bool = False):
        shape = var.shape
        if zero:
            assign(var, jnp.zeros(shape, F32))
        elif ortho and min(shape) >= 64:
            w = jax.nn.initializers.orthogonal()(rngs.params(), shape, F32)
            assign(var, w * scale_proj if proj else w)
        elif not proj:  # the bigram projection keeps its constructor's zeros below 64
            assign(var, torch_default(rngs.params(), shape))

    assign(model.wte.embedding, cfg.embed_init_std * jax.random.normal(rngs.params(), model.wte.embedding.shape, F32))
    if model.lm_head is not None:
        linear(model.lm_head.kernel, zero=True)
    for block in model.blocks:
        a, m = block.attn, block.mlp
        for lin in (a.c_q, a.c_k, a.c_v, m.c_fc) + ((m.c_gate,) if hasattr(m, "c_gate") else ()):
            linear(lin.kernel)
        linear(a.c_proj.kernel, zero=True)
        linear(m.c_proj.kernel, zero=True)
    if cfg.bigram_buckets and model.bigram.proj is not None:
        linear(model.bigram.proj.kernel, proj=True)
