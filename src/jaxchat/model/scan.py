"""The scanned path: with `model.scan_layers`, repeating groups of layers run as one `lax.scan`, so XLA compiles
one group instead of every layer.

A scan runs the same compiled body for every group of layers, so everything static about a layer must repeat
with the group: its attention window (from `window_pattern`) and whether it has a value embedding (alternating
layers). The group length is therefore the pattern's length, doubled when value embeddings alternate with an odd
pattern length (SSSL: 4). The last layer is always long (docs/architecture.md §Attention), so when the pattern
would make it short, the final group no longer repeats and runs unrolled, as do layers beyond the last whole
group (GPT.__call__ runs those).

Parameters stay stored per layer (checkpoints do not depend on this choice): each group position's weights, and
its value-embedding lookups, are stacked along a new leading axis at trace time. Inside the scan a layer's index
is a `GroupLayer` (the group traced, the position in the group static), which `GPT.layer` takes in place of an
int.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxchat.config import ModelConfig
from jaxchat.model.remat import remat


def layer_signature(cfg: ModelConfig, i: int) -> tuple:
    """What the compiled body of layer i depends on besides its weights."""
    return cfg.window_sizes()[i], cfg.has_value_embed(i)


def scan_layout(cfg: ModelConfig) -> tuple[int, int]:
    """(period, n_groups): layers [0, period * n_groups) run as n_groups scanned groups of `period` layers.
    n_groups is 0 when fewer than two whole groups repeat (a scan would then save nothing)."""
    period = math.lcm(len(cfg.window_pattern), 2 if cfg.value_embeds else 1)
    sig = [layer_signature(cfg, i) for i in range(cfg.n_layer)]
    n_groups = 0
    while (n_groups + 1) * period <= cfg.n_layer and all(
            sig[n_groups * period + j] == sig[j] for j in range(period)):
        n_groups += 1
    return (period, n_groups) if n_groups >= 2 else (period, 0)


def describe(cfg: ModelConfig) -> str:
    """One line for reports: how the layers run."""
    if not cfg.scan_layers:
        return f"{cfg.n_layer} layers unrolled"
    period, n = scan_layout(cfg)
    if n == 0:
        return f"{cfg.n_layer} layers unrolled (scan_layers: no group of layers repeats twice)"
    rest = cfg.n_layer - period * n
    return f"scan over {n} groups of {period} layers" + (f" + {rest} unrolled" if rest else "")


class GroupLayer(NamedTuple):
    """Layer `group * period + position` inside the scan: `group` is the scan's traced counter, the rest is static,
    so whether this position can be a given layer stays known at trace time. `ve` is the layer's value-embedding
    lookup (None at positions without one), sliced from the lookups stacked before the scan."""
    group: jax.Array
    position: int
    period: int
    n_groups: int
    ve: jax.Array | None

    @property
    def index(self) -> jax.Array:
        return self.group * self.period + self.position

    def is_layer(self, k: int) -> bool | jax.Array:
        """Whether this is layer k: the Python False when no group has layer k at this position, else a traced
        bool (true in exactly one group)."""
        g, r = divmod(k - self.position, self.period)
        if r or not 0 <= g < self.n_groups:
            return False
        return self.group == g


def scan_groups(model, x, x0, x_mid, idx, p) -> tuple[jax.Array, jax.Array, int]:
    """Run the layers that scan (none without `model.scan_layers`) through `model.layer`, each group position's
    block under `model.remat`. Returns (x, x_mid, the first layer left to run unrolled)."""
    cfg = model.config
    period, n_groups = scan_layout(cfg) if cfg.scan_layers else (1, 0)
    if not n_groups:
        return x, x_mid, 0
    n_scanned = period * n_groups
    graphdefs = [nnx.split(model.blocks[j])[0] for j in range(period)]

    def call_block(gd, state, x, ve):  # a block as a pure function of its params, for remat and scan
        return nnx.merge(gd, state)(x, ve, p)[0]

    stack = lambda trees: jax.tree.map(lambda *a: jnp.stack(a), *trees)  # noqa: E731
    layers = lambda j: range(j, n_scanned, period)  # noqa: E731  the layers at group position j
    states = [stack([nnx.split(model.blocks[i])[1] for i in layers(j)]) for j in range(period)]
    ves = [jnp.stack([model.value_embed(i, idx).astype(x.dtype) for i in layers(j)])
           if cfg.has_value_embed(j) else None for j in range(period)]
    blocks = [remat(partial(call_block, graphdefs[j]), cfg.remat, in_scan=True) for j in range(period)]

    def group(carry, xs):
        x, x_mid = carry
        g, states, ves = xs
        for j in range(period):
            block = lambda x, ve, cache, j=j: (blocks[j](states[j], x, ve), None)  # noqa: E731
            x, x_mid, _ = model.layer(GroupLayer(g, j, period, n_groups, ves[j]), block, x, x0, x_mid, idx)
        return (x, x_mid), None

    (x, x_mid), _ = jax.lax.scan(group, (x, x_mid), (jnp.arange(n_groups), states, ves))
    return x, x_mid, n_scanned
