"""Every tensor's initial value: nanochat's table (`init_weights`, called by `GPT.__init__`), then, with
`model.init`, parameter golf's schemes (docs/architecture.md §Golf):

- `golf` (the baseline): every Linear gets PyTorch's default U(-1/sqrt(in), 1/sqrt(in)), except the zero-init
  ones (attention and MLP output projections, an untied lm_head); wte ~ N(0, model.embed_init_std).
- `golf_ortho` (PR #334's OrthoInit): as `golf`, but a Linear with min(shape) >= 64 is orthogonal (gain 1), and
  one named `proj` (the BigramHash projection; the block projections are zero) is then scaled by 1/sqrt(2L).
  The bigram projection is zeroed in its reference constructor, so below 64 it stays zero.

- `marin` (speedrun PR #2184): nanochat's table, but the untied lm_head is zero (as the O and MLP down
  projections already are), the x0 skip starts at resid_lambdas 1.1 and x0_lambdas 0 for every layer, and the
  backout lambda at 0.5.

Kernels here are (in, out), PyTorch's weights (out, in): "in" is the first axis, and a matrix is orthogonal in
the same sense either way (K^T K = I when in >= out, else K K^T = I).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxchat.dtypes import F32
from jaxchat.model.mlp import YatNMN


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
        elif proj:  # the bigram projection keeps its reference constructor's zeros (baseline, or below 64)
            assign(var, jnp.zeros(shape, F32))
        else:
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


def init_weights(model, rngs: nnx.Rngs) -> None:
    """Every tensor's initial value, in one place (docs/architecture.md §Init; s = sqrt(3) / sqrt(C), U = uniform):

    | tensor                         | init                         |
    |--------------------------------|------------------------------|
    | wte                            | N(0, 0.8)                    |
    | lm_head (untied)               | N(0, 0.001)                  |
    | c_q, c_k, c_v                  | U(-s, s)                     |
    | attn c_proj, mlp c_proj        | zeros                        |
    | mlp c_fc (relu2, gelu, swiglu) | U(-0.4 s, 0.4 s)             |
    | mlp c_fc (yatnmn*)             | xavier normal, bias 0, alpha 1, eps_raw = softplus^-1(eps) |
    | value embeds                   | U(-s, s)                     |
    | ve_gate, smear_gate            | U(0, 0.02)                   |
    | resid_lambdas[i]               | 1.15 - 0.10 i / (L-1)        |
    | x0_lambdas[i]                  | 0.20 - 0.15 i / (L-1)        |
    | smear_lambda, backout_lambda   | 0, 0.2                       |
    | golf switches: q_gain          | model.q_gain                 |
    | resid_mix[i]                   | rows 1 (x) and 0 (x0)        |
    | attn_scale, mlp_scale, skip_weights | 1                       |
    | smear_v1_gate, bigram embed    | 0                            |
    | bigram proj                    | orthogonal / sqrt(2L)        |
    | bigram scale                   | model.bigram_scale           |

    wte's std is `model.embed_init_std` (0.8). With `model.init` golf or golf_ortho, `golf_init` below then
    replaces wte, lm_head, the block Linears and the bigram projection with golf's scheme.
    """
    cfg = model.config
    C, L = cfg.n_embd, cfg.n_layer
    s = math.sqrt(3.0) / math.sqrt(C)

    def uniform(p, lo, hi):
        assign(p, jax.random.uniform(rngs.params(), p.shape, F32, lo, hi))

    def normal(p, std):
        assign(p, std * jax.random.normal(rngs.params(), p.shape, F32))

    def zeros(p):
        assign(p, jnp.zeros(p.shape, F32))

    normal(model.wte.embedding, cfg.embed_init_std)
    if model.lm_head is not None:
        normal(model.lm_head.kernel, 0.001)
    for block in model.blocks:
        a, m = block.attn, block.mlp
        for lin in (a.c_q, a.c_k, a.c_v):
            uniform(lin.kernel, -s, s)
        zeros(a.c_proj.kernel)
        if a.ve_gate is not None:
            uniform(a.ve_gate.kernel, 0.0, 0.02)
        zeros(m.c_proj.kernel)
        if isinstance(m.c_fc, YatNMN):
            assign(m.c_fc.kernel, jax.nn.initializers.xavier_normal()(rngs.params(), m.c_fc.kernel.shape))
            zeros(m.c_fc.bias)
            assign(m.c_fc.alpha, jnp.ones((1,), F32))
            if m.c_fc.softplus:  # softplus(eps_raw) = eps
                assign(m.c_fc.epsilon_param, jnp.full((1,), math.log(math.expm1(cfg.yatnmn_eps)), F32))
        else:
            uniform(m.c_fc.kernel, -0.4 * s, 0.4 * s)
            if hasattr(m, "c_gate"):
                uniform(m.c_gate.kernel, -0.4 * s, 0.4 * s)
    for ve in model.value_embeds.values():
        uniform(ve.embedding, -s, s)
    if cfg.residual_lambdas:
        frac = jnp.arange(L, dtype=F32) / max(L - 1, 1)
        assign(model.resid_lambdas, 1.15 - 0.10 * frac)
        assign(model.x0_lambdas, 0.20 - 0.15 * frac)
    if cfg.smear:
        uniform(model.smear_gate.kernel, 0.0, 0.02)
        zeros(model.smear_lambda)
    if cfg.backout:
        assign(model.backout_lambda, jnp.full((1,), 0.2, F32))
    for block in model.blocks:
        if cfg.q_gain > 0:
            assign(block.attn.q_gain, jnp.full((cfg.n_head,), cfg.q_gain, F32))
        if cfg.golf_block:
            assign(block.attn_scale, jnp.ones((C,), F32))
            assign(block.mlp_scale, jnp.ones((C,), F32))
    if cfg.golf_block:
        assign(model.resid_mix, jnp.stack([jnp.ones((L, C), F32), jnp.zeros((L, C), F32)], axis=1))
    if cfg.unet:
        assign(model.skip_weights, jnp.ones(model.skip_weights.shape, F32))
    if cfg.smear_v1:
        zeros(model.smear_v1_gate)
    if cfg.bigram_buckets:
        zeros(model.bigram.embed)
        if model.bigram.proj is not None:  # PR #334's final init of it: a zero table and a zero projection would
            # give each other zero gradients, so BigramHash would never learn (seen in docs/LOG.md's ablation)
            ortho = jax.nn.initializers.orthogonal()(rngs.params(), model.bigram.proj.kernel.shape, F32)
            assign(model.bigram.proj.kernel, ortho / math.sqrt(2 * L))
        assign(model.bigram.scale, jnp.asarray(cfg.bigram_scale, F32))
    if cfg.init == "marin":
        marin_init(model)
    elif cfg.init != "nanochat":
        golf_init(model, rngs, ortho=cfg.init == "golf_ortho")


def marin_init(model) -> None:
    """marin's changes to nanochat's table: zero lm_head, x0 skip lambdas 1.1 and 0, backout lambda 0.5."""
    cfg = model.config
    if model.lm_head is not None:
        assign(model.lm_head.kernel, jnp.zeros(model.lm_head.kernel.shape, F32))
    if cfg.residual_lambdas:
        assign(model.resid_lambdas, jnp.full((cfg.n_layer,), 1.1, F32))
        assign(model.x0_lambdas, jnp.zeros((cfg.n_layer,), F32))
    if cfg.backout:
        assign(model.backout_lambda, jnp.full((1,), 0.5, F32))
