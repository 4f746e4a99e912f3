"""Which layers `model.scan_layers` can run as one `lax.scan` (see GPT.run_blocks).

A scan runs the same compiled body for every group of layers, so everything static about a layer must repeat
with the group: its attention window (from `window_pattern`) and whether it has a value embedding (alternating
layers). The group length is therefore the pattern's length, doubled when value embeddings alternate with an odd
pattern length (SSSL: 4). The last layer is always long (SPEC §1), so when the pattern would make it short, the
final group no longer repeats and runs unrolled, as do layers beyond the last whole group.
"""

from __future__ import annotations

import math

from jaxchat.config import ModelConfig


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
