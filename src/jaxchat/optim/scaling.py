"""Scaling from depth (docs/architecture.md §Scaling): nanochat's `base_train` rules, from parameter shapes alone.
The planner (jaxchat/plan.py) applies them to a run's config.

- Shape: C = ceil(64 * depth / 128) * 128, head_dim D = 128, H = K = C / 128 (`nanochat_shape`).
- Scaling params N = block matrices (every 2-D kernel inside `blocks`, ve_gate included) + lm_head (with tied
  embeddings the shared `wte` is the unembedding matrix and is counted in lm_head's place). yatnmn's bias,
  alpha and eps are vectors, not block matrices, and are left out.
- Token horizon ("D" in the formulas, *tokens*, not depth): D = int(ratio * N); the d12 reference is
  D_d12 = ratio * N(d12), where d12 is the same config family at nanochat's depth-12 shape (C 768, H 6).
  The ratio cancels in D / D_d12, so batch and weight decay depend only on N / N(d12).
- Total batch (Power Lines, B ~ D^0.383): B = 2^round(log2(2^19 * (D / D_d12)^0.383)) tokens.
- Every lr x sqrt(B / 2^19). Muon's weight decay (0.28) x sqrt(B / 2^19) * D_d12 / D (the T_epoch rule).
  nanochat scales only Muon's decay this way; the AdamW groups keep their constant decays (see groups.py).
- Horizon precedence (plan.py): num_steps > 0, else target_flops > 0 (steps = round(F / (flops_per_token * B)),
  FLOPs per token from `jaxchat.model.accounting`), else steps = D // B (floor, as nanochat). Batch size is always
  derived from the ratio horizon D.

Checked numbers (vocab 32768, seq 2048): d12 ratio 12 -> B 524,288, 2,520 steps, 1.32B tokens; d20 ratio 12 ->
B 1,048,576, 4,980 steps; d24 ratio 8 -> B 1,048,576, 5,568 steps, 5.84B tokens, 2.79e19 FLOPs.
"""

from __future__ import annotations

import functools
import math
from dataclasses import replace

from flax import nnx

from jaxchat.config import ModelConfig
from jaxchat.model.accounting import param_shapes

B_REF = 2**19  # tokens: nanochat's measured optimal batch at d12
DEFAULT_RATIO = 12  # tokens per scaling parameter when a run sets no train.target_param_data_ratio
BATCH_EXPONENT = 0.383
REF_DEPTH = 12
ASPECT_RATIO = 64
HEAD_DIM = 128


def nanochat_shape(depth: int, aspect_ratio: int = ASPECT_RATIO, head_dim: int = HEAD_DIM) -> dict:
    """nanochat's width from depth: C = ceil(depth * 64 / 128) * 128, H = K = C / 128."""
    n_embd = -(-depth * aspect_ratio // head_dim) * head_dim
    return dict(n_embd=n_embd, n_head=n_embd // head_dim, n_kv_head=n_embd // head_dim)


def nanochat_config(depth: int, base: ModelConfig | None = None, **overrides) -> ModelConfig:
    """`base` (default: ModelConfig()) reshaped to nanochat's depth-`depth` model."""
    return replace(base or ModelConfig(), n_layer=depth, **nanochat_shape(depth), **overrides)


def reference_config(cfg: ModelConfig) -> ModelConfig:
    """The d12 reference of cfg's family: same vocab, MLP kind, tying..., at nanochat's depth-12 shape."""
    return nanochat_config(REF_DEPTH, cfg)


@functools.lru_cache(maxsize=32)
def scaling_params(cfg: ModelConfig) -> int:
    """Block matrices + lm_head (the tied wte when embeddings are tied): nanochat's scaling-law N."""
    n = 0
    for path, v in nnx.to_flat_state(param_shapes(cfg)):
        head = path[0] == "lm_head" or (cfg.tie_embeddings and path[0] == "wte")
        if head or (path[0] == "blocks" and len(v.shape) == 2):
            n += math.prod(v.shape)
    return n


def target_tokens(cfg: ModelConfig, ratio: float) -> int:
    """D = int(ratio * N), the compute-optimal horizon in tokens."""
    return int(ratio * scaling_params(cfg))


def reference_tokens(cfg: ModelConfig, ratio: float) -> float:
    """D_d12 = ratio * N(d12 reference)."""
    return ratio * scaling_params(reference_config(cfg))


def auto_batch_tokens(cfg: ModelConfig, ratio: float = DEFAULT_RATIO) -> int:
    """B = 2^round(log2(2^19 * (D / D_d12)^0.383))."""
    if ratio <= 0:
        raise ValueError(f"ratio={ratio}: the automatic batch size needs a positive tokens:params ratio; "
                         f"pass total_batch_size explicitly instead")
    pred = B_REF * (target_tokens(cfg, ratio) / reference_tokens(cfg, ratio)) ** BATCH_EXPONENT
    return 2 ** round(math.log2(pred))


def lr_scale(batch_tokens: int) -> float:
    """sqrt(B / 2^19), applied to every learning rate."""
    return math.sqrt(batch_tokens / B_REF)


def weight_decay_scale(cfg: ModelConfig, batch_tokens: int, ratio: float = DEFAULT_RATIO) -> float:
    """sqrt(B / 2^19) * D_d12 / D, applied to Muon's weight decay (a ratio <= 0 falls back to DEFAULT_RATIO: the
    ratio cancels in D_d12 / D up to nanochat's int() rounding of D)."""
    ratio = ratio if ratio > 0 else DEFAULT_RATIO
    return math.sqrt(batch_tokens / B_REF) * reference_tokens(cfg, ratio) / target_tokens(cfg, ratio)


__all__ = ["nanochat_shape", "nanochat_config", "reference_config", "scaling_params", "target_tokens",
           "auto_batch_tokens", "lr_scale", "weight_decay_scale", "B_REF", "DEFAULT_RATIO"]
