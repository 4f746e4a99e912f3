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


def optax_reference(o: OptimConfig, N: int):
    """What adamw() was before it took `finite`: optax's own chain, the arithmetic it must reproduce."""
    import optax
    parts = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
    parts.append(optax.adamw(warmup_cosine(o, N), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay))
    return optax.chain(*parts)


def grads_at(t, shapes):
    rng = np.random.default_rng(t)
    return {k: jnp.asarray(rng.normal(size=s) * (3.0 if t % 2 else 0.01), jnp.float32) for k, s in shapes.items()}


@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_updates_and_state_are_optaxs(clip):
    """Six jitted steps (the odd ones clipped when clip is on) against optax.chain(clip, adamw): the same state
    layout, and updates and moments equal to within fp32 rounding (XLA may fuse the two programs differently)."""
    import jax
    import optax
    o = OptimConfig(lr=0.05, warmup_steps=2, grad_clip=clip, weight_decay=0.1)
    shapes = {"a": (7, 5), "b": (11,)}
    params = {k: jnp.asarray(np.random.default_rng(9).normal(size=s), jnp.float32) for k, s in shapes.items()}
    ours, ref = adamw(o, 6), optax_reference(o, 6)
    s_ours, s_ref = ours.init(params), ref.init(params)
    assert jax.tree.structure(s_ours) == jax.tree.structure(s_ref)
    step_ours, step_ref = jax.jit(ours.update), jax.jit(ref.update)
    p_ours = p_ref = params
    for t in range(6):
        u_ours, s_ours = step_ours(grads_at(t, shapes), s_ours, p_ours)
        u_ref, s_ref = step_ref(grads_at(t, shapes), s_ref, p_ref)
        p_ours, p_ref = optax.apply_updates(p_ours, u_ours), optax.apply_updates(p_ref, u_ref)
        for a, b in zip(jax.tree.leaves((u_ours, s_ours)), jax.tree.leaves((u_ref, s_ref))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=0)
    assert np.abs(np.asarray(p_ours["a"]) - np.asarray(params["a"])).max() > 0.05  # the params did move


def test_a_nonfinite_step_leaves_the_state_bit_for_bit():
    """finite=False mid-training (moments and counts non-zero, NaN and inf in the gradient): the state comes back
    unchanged bit for bit, where finite=True with a finite gradient changes it."""
    import jax
    o = OptimConfig(lr=0.05, warmup_steps=2, grad_clip=1.0, weight_decay=0.1)
    shapes = {"a": (7, 5), "b": (11,)}
    params = {k: jnp.zeros(s, jnp.float32) for k, s in shapes.items()}
    tx = adamw(o, 10)
    update = jax.jit(tx.update)
    state = tx.init(params)
    for t in range(3):
        _, state = update(grads_at(t, shapes), state, params)
    bad = grads_at(3, shapes)
    bad = {"a": bad["a"].at[0, 0].set(jnp.nan), "b": bad["b"].at[1].set(jnp.inf)}
    _, kept = update(bad, state, params, finite=jnp.bool_(False))
    before, after = jax.tree.leaves(state), jax.tree.leaves(kept)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(before, after))
    assert int(jax.tree.leaves(state)[0]) == 3 and np.abs(np.asarray(state[1][0].mu["a"])).max() > 0
    _, moved = update(grads_at(3, shapes), state, params, finite=jnp.bool_(True))
    assert not np.array_equal(np.asarray(moved[1][0].nu["a"]), np.asarray(state[1][0].nu["a"]))
