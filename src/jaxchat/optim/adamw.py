"""The seed model cards' recipe: AdamW over every parameter, warmup then cosine decay, global-norm clipping.

`adamw` is optax's `chain(clip_by_global_norm, adamw(schedule))`: the same state, the same arithmetic op for op
(XLA fuses the two programs differently, so a result may differ in its last bit), and one difference: its update
takes the train step's `finite` flag (are the step's loss and gradient finite?) and skips itself through scalars.
Where `finite` is False the gradient enters as zero, the moments' decay factors as 1 and the counts stay, so the
state comes back bit for bit (the moments hold only values of finite steps, never -0.0, so m * 1 + 0 * 0 is m).
The train step's generic guard, `where(finite, new, old)` on every moment, made XLA:CPU write each new moment to a
buffer of its own and copy it back (the optimizer at cpu-bench alone: 27 -> 16.5 ms; docs/LOG.md, session 14).
The new params are still selected by the train step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxchat.config import OptimConfig


def warmup_cosine(o: OptimConfig, num_steps: int) -> optax.Schedule:
    """0 -> lr linearly over warmup_steps, then cosine down to end_lr_frac * lr at num_steps."""
    warmup = min(o.warmup_steps, max(num_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=o.lr, warmup_steps=warmup,
        decay_steps=max(num_steps, warmup + 1), end_value=o.lr * o.end_lr_frac)


class SkipsNonFinite(optax.GradientTransformationExtraArgs):
    """An optimizer whose `update(grads, state, params, finite=flag)` returns `state` unchanged where `flag` is
    False (its updates are then meaningless: the train step keeps the old params)."""


def keeps_state_when_nonfinite(optimizer) -> bool:
    return isinstance(optimizer, SkipsNonFinite)


def adamw(o: OptimConfig, num_steps: int) -> SkipsNonFinite:
    schedule = warmup_cosine(o, num_steps)
    clip = optax.clip_by_global_norm(o.grad_clip) if o.grad_clip > 0 else None
    parts = [clip] if clip else []
    parts.append(optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay))
    reference = optax.chain(*parts)  # gives the state layout (checkpoints and flaxchat import read it)

    def update(grads, state, params, *, finite=True, **extra):
        del extra
        adam, decay, sched = state[-1]
        if clip:  # optax's own (stateless): a non-finite norm makes the clipped gradient NaN, zeroed below
            grads, _ = clip.update(grads, state[0])
        grads = jax.tree.map(lambda t: jnp.where(finite, t, 0.0), grads)
        # optax's moment update is (1 - b) * g^k + b * m with Python-float constants; these are the same f32s
        c1, d1 = (jnp.where(finite, jnp.float32(v), skip) for v, skip in ((1 - o.b1, 0.0), (o.b1, 1.0)))
        c2, d2 = (jnp.where(finite, jnp.float32(v), skip) for v, skip in ((1 - o.b2, 0.0), (o.b2, 1.0)))
        mu = jax.tree.map(lambda g, m: c1 * g + d1 * m, grads, adam.mu)
        nu = jax.tree.map(lambda g, v: c2 * (g ** 2) + d2 * v, grads, adam.nu)
        count = optax.safe_increment(adam.count)
        correct1, correct2 = 1 - o.b1 ** count, 1 - o.b2 ** count
        step_size = -schedule(sched.count)

        def direction(m, v, p):
            u = (m / correct1.astype(m.dtype)) / (jnp.sqrt(v / correct2.astype(v.dtype) + 0.0) + o.eps)
            return jnp.array(step_size, dtype=u.dtype) * (u + o.weight_decay * p)

        updates = jax.tree.map(direction, mu, nu, params)
        adam = adam._replace(count=jnp.where(finite, count, adam.count), mu=mu, nu=nu)
        sched = sched._replace(count=jnp.where(finite, optax.safe_increment(sched.count), sched.count))
        return updates, state[:-1] + ((adam, decay, sched),)

    return SkipsNonFinite(reference.init, update)
