"""The seed model cards' recipe: AdamW over every parameter, warmup then cosine decay, global-norm clipping."""

from __future__ import annotations

import optax

from jaxchat.config import OptimConfig


def warmup_cosine(o: OptimConfig, num_steps: int) -> optax.Schedule:
    """0 -> lr linearly over warmup_steps, then cosine down to end_lr_frac * lr at num_steps."""
    warmup = min(o.warmup_steps, max(num_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=o.lr, warmup_steps=warmup,
        decay_steps=max(num_steps, warmup + 1), end_value=o.lr * o.end_lr_frac)


def adamw(o: OptimConfig, num_steps: int) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
    parts.append(optax.adamw(warmup_cosine(o, num_steps), b1=o.b1, b2=o.b2, eps=o.eps,
                             weight_decay=o.weight_decay))
    return optax.chain(*parts)
