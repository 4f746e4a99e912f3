"""Activation checkpointing (remat) policies by name, applied to each transformer block (`model.remat`).

A policy says which intermediate values of a block the backward pass may keep from the forward; everything else
is recomputed. Fewer saved values = less memory, more compute.

| name            | saved from the forward                                            |
|-----------------|-------------------------------------------------------------------|
| `none`          | everything (no remat; the default)                                 |
| `full`          | only the block's inputs: the whole block runs again in the backward |
| `dots`          | every matmul output, attention scores included                    |
| `dots_no_batch` | matmul outputs without batch dims: the projections, not attention  |
| `save_qkv_proj` | the q, k, v projections (tagged `q_proj`, `k_proj`, `v_proj`)      |
| `save_out_proj` | the outputs of attention's and the MLP's output projections        |

The tags are `jax.ad_checkpoint.checkpoint_name` calls in model/gpt.py.
"""

from __future__ import annotations

import jax
from jax.ad_checkpoint import checkpoint_name

from jaxchat.config import REMAT_POLICIES
from jaxchat.model.cpu_dots import MATMUL_NAME

_cp = jax.checkpoint_policies
_cpu_matmuls = _cp.save_only_these_names(MATMUL_NAME)  # on a CPU the projections are custom-VJP calls, not dots
POLICIES = {
    "full": _cp.nothing_saveable,
    "dots": _cp.save_from_both_policies(_cp.dots_saveable, _cpu_matmuls),
    "dots_no_batch": _cp.save_from_both_policies(_cp.dots_with_no_batch_dims_saveable, _cpu_matmuls),
    "save_qkv_proj": _cp.save_only_these_names("q_proj", "k_proj", "v_proj"),
    "save_out_proj": _cp.save_only_these_names("attn_out_proj", "mlp_out_proj"),
}
assert set(POLICIES) | {"none"} == set(REMAT_POLICIES), "config.REMAT_POLICIES and model/remat.py disagree"


def remat(fn, policy: str, in_scan: bool = False):
    """`fn` under the named policy ('none' returns it unchanged). Inside lax.scan, CSE prevention is not needed
    (the loop already keeps XLA from merging recomputation into the forward) and only costs speed."""
    if policy == "none":
        return fn
    return jax.checkpoint(fn, policy=POLICIES[policy], prevent_cse=not in_scan)


__all__ = ["remat", "checkpoint_name", "POLICIES"]
