"""optim/adamw.py, the seed cards' recipe, against a float64 hand computation of warmup + cosine and against
numpy AdamW with and without global-norm clipping.

Reference schedule (written here): W = min(warmup_steps, max(N - 1, 0)); lr(t) = lr t / W for t < W, then
end + (lr - end) (1 + cos(pi (t - W) / (max(N, W + 1) - W))) / 2, end = end_lr_frac lr."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxchat.config import OptimConfig
from jaxchat.optim.adamw import adamw, warmup_cosine


def ref_schedule(t, N, lr, W, frac):
    W = min(W, max(N - 1, 0))
    end = frac * lr
    if t < W:
        return lr * t / W
    return end + (lr - end) * 0.5 * (1 + math.cos(math.pi * min(t - W, max(N, W + 1) - W) / (max(N, W + 1) - W)))


@pytest.mark.parametrize("N,W", [(20, 5), (5, 10), (1, 3), (8, 0)])  # warmup cut to N - 1 at (5, 10) and (1, 3)
def test_warmup_cosine_by_hand(N, W):
    o = OptimConfig(lr=0.02, warmup_steps=W, end_lr_frac=0.1)
    sched = warmup_cosine(o, N)
    got = [float(sched(t)) for t in range(N + 1)]
    want = [ref_schedule(t, N, 0.02, W, 0.1) for t in range(N + 1)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
    assert got[N] == pytest.approx(0.002)  # end_lr_frac * lr at N


def test_warmup_is_cut_to_leave_one_decay_step_by_hand():
    sched = warmup_cosine(OptimConfig(lr=1.0, warmup_steps=10, end_lr_frac=0.0), 5)  # warmup 4, decay 4 -> 5
    assert [round(float(sched(t)), 6) for t in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 0.0]


def adam_first_update(g, p, lr, eps, wd):
    """numpy AdamW, step 1 (bias-corrected m = g, v = g^2)."""
    return -lr * (g / (np.abs(g) + eps) + wd * p)


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_clipping_only_when_asked(clip):
    """grad_clip 0 disables clipping; 0.5 scales the gradient to norm 0.5 first (visible through eps)."""
    o = OptimConfig(lr=0.1, warmup_steps=0, end_lr_frac=1.0, grad_clip=clip, eps=1.0, weight_decay=0.0)
    p = {"w": jnp.asarray([1.0, -2.0, 3.0])}
    g = np.array([3.0, 4.0, 0.0])  # norm 5
    tx = adamw(o, 10)
    updates, _ = tx.update({"w": jnp.asarray(g)}, tx.init(p), p)
    g_used = g * (0.5 / 5.0) if clip else g
    np.testing.assert_allclose(np.asarray(updates["w"]), adam_first_update(g_used, np.asarray(p["w"]), 0.1, 1.0, 0),
                               rtol=1e-5)
    assert np.abs(np.asarray(updates["w"])).max() > 0.01
