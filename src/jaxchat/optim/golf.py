"""Parameter golf's optimizer (PR #334 and the naive baseline; SPEC_SPEEDRUN §2, docs/architecture.md §Golf
recipe): `optim.optimizer=golf`.

Muon (`golf_muon`) on every 2-D matrix inside `blocks` (and the BigramHash projection), per (in, out) kernel K
with gradient G, lr the scheduled matrix lr, mu the scheduled momentum:

    buf = mu * buf + G                         momentum buffer (fp32)
    U   = G + mu * buf                         Nesterov
    X   = U / (||U||_F + 1e-7), in bf16        then 5 Newton-Schulz quintic steps (a, b, c) =
    X   = a X + (b A + c A^2) X, A = X X^T     (3.4445, -4.7750, 2.0315), the Gram over the smaller side
    P   = (P - lr sqrt(max(1, out/in)) X) * (1 - wd * lr)     decoupled weight decay after the step

(`orthogonalizer="polar_express"` runs nanochat's Polar Express instead of the quintic: optim/muon.py.)
In PyTorch terms (weight W = K^T, (out, in)) the quintic transposes when rows > cols, so the Gram matrix is
always the smaller one; the same holds here (see optim/muon.py on orientation).

Adam (betas (0.9, 0.95), eps 1e-8, no weight decay by default: SPEC_SPEEDRUN §2 from the code; the PR page's
summary lists Adam weight_decay 0.04, available as `{"scalars": {"wd": 0.04}}`, decoupled as torch's AdamW) for
the rest: the token embedding and the BigramHash table
(`embed`, lr 0.05 tied / 0.6 untied), the untied lm_head (`head`, 0.008) and every vector and scalar (`scalars`,
0.04). Every lr follows `lr_scale`: 1, then linear to 0 over the last `warmdown_iters` steps. Muon's momentum
warms up linearly from 0.85 to 0.95 over `momentum_warmup_steps` (500).

`optim.groups` overrides, a JSON object: {"muon": {"lr", "wd", "momentum", "momentum_start",
"momentum_warmup_steps", "ns_steps", "ns_dtype", "orthogonalizer"}, "embed" / "head" / "scalars": {"lr",
"betas", "wd"}, "warmdown_iters"}.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxchat.config import ModelConfig
from jaxchat.dtypes import F32
from jaxchat.model.gpt import param_path
from jaxchat.optim.muon import lr_factor, polar_express

NS5_COEFFS = (3.4445, -4.7750, 2.0315)  # golf's (modded-nanogpt's) quintic, the same every step
NS_EPS = 1e-7

GOLF_MUON = dict(lr=0.04, wd=0.04, momentum=0.95, momentum_start=0.85, momentum_warmup_steps=500, ns_steps=5,
                 ns_dtype="bfloat16", orthogonalizer="ns5")
GOLF_ADAM = {"embed": dict(lr=0.05, betas=(0.9, 0.95), wd=0.0), "head": dict(lr=0.008, betas=(0.9, 0.95), wd=0.0),
             "scalars": dict(lr=0.04, betas=(0.9, 0.95), wd=0.0)}
UNTIED_EMBED_LR = 0.6
ADAM_EPS = 1e-8
WARMDOWN_ITERS = 3000
GROUPS = ("embed", "head", "scalars", "muon")
ORTHOGONALIZERS = ("ns5", "polar_express")


def newton_schulz5(g: jax.Array, steps: int = 5, dtype=jnp.bfloat16) -> jax.Array:
    """Golf's zeropower_via_newtonschulz5 for (..., in, out) kernels: normalise by the Frobenius norm (+1e-7),
    then `steps` quintic iterations in `dtype` (fp32 accumulation). Returns fp32."""
    a, b, c = NS5_COEFFS
    x = g.astype(dtype)
    fro = jnp.sqrt(jnp.sum(jnp.square(x.astype(F32)), axis=(-2, -1), keepdims=True))
    x = (x.astype(F32) / (fro + NS_EPS)).astype(dtype)
    wide = x.shape[-2] < x.shape[-1]  # in < out: PyTorch W (out, in) has rows > cols, golf transposes it
    prec = "highest" if x.dtype == F32 else None
    mm = lambda p, q: jnp.matmul(p, q, precision=prec, preferred_element_type=F32)  # noqa: E731
    xt = lambda m: jnp.swapaxes(m, -1, -2)  # noqa: E731
    for _ in range(steps):
        A = (mm(x, xt(x)) if wide else mm(xt(x), x)).astype(dtype)
        B = (b * A.astype(F32) + c * mm(A, A)).astype(dtype)
        x = (a * x.astype(F32) + (mm(B, x) if wide else mm(x, B))).astype(dtype)
    return x.astype(F32)


class GolfMuonState(NamedTuple):
    count: jax.Array  # int32, the step the next update uses for its schedules
    momentum: Any  # fp32, same tree as params


def _at(x, count):
    return x(count) if callable(x) else x


def golf_muon(learning_rate, momentum=0.95, weight_decay: float = 0.0, ns_steps: int = 5, ns_dtype=jnp.bfloat16,
              orthogonalizer: str = "ns5") -> optax.GradientTransformation:
    """Golf's Muon (module docstring) over a pytree of 2-D (in, out) kernels. learning_rate and momentum: floats
    or schedules f(count). The update returned already includes the decoupled weight decay, so `update` needs
    `params`."""
    if orthogonalizer not in ORTHOGONALIZERS:
        raise ValueError(f"golf muon orthogonalizer={orthogonalizer!r}: choose one of {', '.join(ORTHOGONALIZERS)}")
    ortho = newton_schulz5 if orthogonalizer == "ns5" else polar_express

    def init_fn(params):
        for path, leaf in jax.tree_util.tree_leaves_with_path(params):
            if jnp.ndim(leaf) != 2:
                raise ValueError(f"golf muon: parameter {jax.tree_util.keystr(path)} has shape {jnp.shape(leaf)}; "
                                 f"Muon updates 2-D (in, out) matrices only")
        return GolfMuonState(jnp.zeros([], jnp.int32), jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), F32), params))

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("golf muon: update() needs params (the decoupled weight decay reads them)")
        lr = jnp.asarray(_at(learning_rate, state.count), F32)
        mu = jnp.asarray(_at(momentum, state.count), F32)

        def one(g, buf, p):
            g = g.astype(F32)
            buf = mu * buf + g
            x = ortho(g + mu * buf, ns_steps, ns_dtype) * lr_factor(g.shape)
            pf = p.astype(F32)
            new = (pf - lr * x) * (1.0 - weight_decay * lr)
            return (new - pf).astype(p.dtype), buf

        g_leaves, treedef = jax.tree.flatten(updates)
        pairs = [one(g, b, p) for g, b, p in zip(g_leaves, jax.tree.leaves(state.momentum), jax.tree.leaves(params))]
        ups = jax.tree.unflatten(treedef, [u for u, _ in pairs])
        bufs = jax.tree.unflatten(jax.tree.structure(state.momentum), [b for _, b in pairs])
        return ups, GolfMuonState(optax.safe_int32_increment(state.count), bufs)

    return optax.GradientTransformation(init_fn, update_fn)


def lr_scale(step, num_steps: int, warmdown_iters: int = WARMDOWN_ITERS):
    """Golf's lr multiplier by step: 1, then (N - step) / warmdown_iters over the last warmdown_iters steps."""
    s = jnp.asarray(step, F32)
    if warmdown_iters <= 0:
        return jnp.ones_like(s)
    start = max(num_steps - warmdown_iters, 0)
    down = jnp.maximum((num_steps - s) / max(warmdown_iters, 1), 0.0)
    return jnp.where((s >= start) & (s < num_steps), down, 1.0).astype(F32)


def lr_scale_wallclock(elapsed_s: float, steps_done: int, max_seconds: float,
                       warmdown_iters: int = WARMDOWN_ITERS) -> float:
    """Golf's wall-clock-aware multiplier: with the measured time per step, the warmdown starts when the time
    left covers warmdown_iters steps, and falls linearly to 0 at the cap: remaining / (warmdown_iters * step time)."""
    if warmdown_iters <= 0:
        return 1.0
    step_s = elapsed_s / max(steps_done, 1)
    warmdown_s = warmdown_iters * step_s
    remaining = max(max_seconds - elapsed_s, 0.0)
    return remaining / max(warmdown_s, 1e-9) if remaining <= warmdown_s else 1.0


def momentum_at(step, start: float = 0.85, end: float = 0.95, warmup_steps: int = 500):
    """Muon's momentum: linear from `start` to `end` over `warmup_steps`, then `end`."""
    frac = jnp.minimum(jnp.asarray(step, F32) / max(warmup_steps, 1), 1.0)
    return ((1.0 - frac) * start + frac * end).astype(F32)


def group_of(path: tuple[str, ...], shape: tuple[int, ...]) -> str:
    """Which golf group a parameter belongs to (module docstring)."""
    top = path[0]
    if top == "wte" or path[:2] == ("bigram", "embed"):
        return "embed"
    if top == "lm_head":
        return "head"
    if len(shape) == 2 and (top == "blocks" or path[:2] == ("bigram", "proj")):
        return "muon"
    if top == "value_embeds":
        return "embed"
    return "scalars"


def hparams(model_cfg: ModelConfig, overrides: dict | None = None) -> dict:
    """Every group's settings after `optim.groups` overrides (unknown keys are refused by name)."""
    o = dict(overrides or {})
    known = set(GROUPS) | {"warmdown_iters"}
    bad = set(o) - known
    if bad:
        raise ValueError(f"optim.groups for optimizer golf: unknown entries {sorted(bad)}; use "
                         f"{', '.join(sorted(known))}")
    out = {}
    for name, base in GOLF_ADAM.items():
        h = dict(base)
        if name == "embed" and not model_cfg.tie_embeddings:
            h["lr"] = UNTIED_EMBED_LR
        extra = set(o.get(name, {})) - {"lr", "betas", "wd"}
        if extra:
            raise ValueError(f"optim.groups {name}: unknown fields {sorted(extra)}; use lr, betas, wd")
        out[name] = {**h, **o.get(name, {})}
    m = {**GOLF_MUON, **o.get("muon", {})}
    extra = set(o.get("muon", {})) - set(GOLF_MUON)
    if extra:
        raise ValueError(f"optim.groups muon: unknown fields {sorted(extra)}; use {', '.join(GOLF_MUON)}")
    out["muon"] = m
    out["warmdown_iters"] = int(o.get("warmdown_iters", WARMDOWN_ITERS))
    return out


def golf_optimizer(params_state, model_cfg: ModelConfig, num_steps: int, overrides: dict | None = None,
                   wallclock: bool = False) -> optax.GradientTransformation:
    """Golf's Muon + Adam groups. `wallclock` (train.max_seconds set): the step warmdown is replaced by a scale the
    training loop sets before every step from the elapsed time (`lr_scale_wallclock`, `set_wallclock_scale`); it
    lives in the optimizer state (optax.inject_hyperparams), so it is checkpointed with it."""
    hp = hparams(model_cfg, overrides)
    labels = jax.tree_util.tree_map_with_path(lambda kp, x: group_of(param_path(kp), jnp.shape(x)), params_state)
    present = set(jax.tree.leaves(labels))
    group_fn: Callable = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda kp, x: group_of(param_path(kp), jnp.shape(x)), params)

    def build(lr_scale_now=None):
        if lr_scale_now is None:
            sched = lambda c: lr_scale(c, num_steps, hp["warmdown_iters"])  # noqa: E731
        else:
            sched = lambda c: jnp.asarray(lr_scale_now, F32)  # noqa: E731
        transforms = {}
        for name in GROUPS:
            if name not in present:
                continue
            if name == "muon":
                m = hp["muon"]
                transforms[name] = golf_muon(
                    learning_rate=lambda c, peak=m["lr"]: peak * sched(c),
                    momentum=lambda c: momentum_at(c, m["momentum_start"], m["momentum"],
                                                   m["momentum_warmup_steps"]),
                    weight_decay=m["wd"], ns_steps=m["ns_steps"], ns_dtype=jnp.dtype(m["ns_dtype"]),
                    orthogonalizer=m["orthogonalizer"])
            else:
                h = hp[name]
                transforms[name] = optax.adamw(lambda c, peak=h["lr"]: peak * sched(c), b1=h["betas"][0],
                                               b2=h["betas"][1], eps=ADAM_EPS, weight_decay=h["wd"])
        return optax.multi_transform(transforms, group_fn)

    if not wallclock:
        return build()
    return optax.inject_hyperparams(build)(lr_scale_now=1.0)


def set_wallclock_scale(opt_state, value: float):
    """The optimizer state with its wall-clock lr scale set to `value` (placed as the old one)."""
    old = opt_state.hyperparams["lr_scale_now"]
    new = jax.device_put(jnp.asarray(value, old.dtype), old.sharding)
    return opt_state._replace(hyperparams={**opt_state.hyperparams, "lr_scale_now": new})


def describe(params_state, model_cfg: ModelConfig, num_steps: int, overrides: dict | None = None) -> list[dict]:
    """One row per present group for `jaxchat plan`."""
    hp = hparams(model_cfg, overrides)
    labels = jax.tree.leaves(jax.tree_util.tree_map_with_path(
        lambda kp, x: group_of(param_path(kp), jnp.shape(x)), params_state))
    sizes = [math.prod(jnp.shape(x)) for x in jax.tree.leaves(params_state)]
    rows = []
    for name in GROUPS:
        n = [s for lab, s in zip(labels, sizes) if lab == name]
        if not n:
            continue
        if name == "muon":
            m = hp["muon"]
            rows.append(dict(group=name, kind="muon", tensors=len(n), params=sum(n), lr=m["lr"], wd=m["wd"],
                             betas=None))
        else:
            rows.append(dict(group=name, kind="adam", tensors=len(n), params=sum(n), lr=hp[name]["lr"],
                             wd=hp[name]["wd"],
                             betas=hp[name]["betas"]))
    return rows


__all__ = ["NS5_COEFFS", "newton_schulz5", "golf_muon", "golf_optimizer", "lr_scale", "lr_scale_wallclock",
           "set_wallclock_scale",
           "momentum_at", "group_of", "describe"]
