"""nanochat's optimizer: six AdamW groups and Muon, one optax.multi_transform (docs/architecture.md §Optimizer).

| group          | parameters                                     | peak lr (x sqrt(B/2^19))  | betas        | wd    |
|----------------|------------------------------------------------|---------------------------|--------------|-------|
| lm_head        | lm_head.kernel                                 | 0.008 w                   | (0.8, 0.96)  | 0.01  |
| wte            | wte.embedding (also the unembedding when tied) | 0.3 w                     | (0.8, 0.995) | 0.001 |
| value_embeds   | value_embeds.*.embedding                       | 0.15 w (half of wte's)    | (0.8, 0.995) | 0.01  |
| resid_lambdas  | resid_lambdas                                  | 0.005                     | (0.8, 0.95)  | 0.05  |
| x0_lambdas     | x0_lambdas                                     | 0.5                       | (0.96, 0.95) | 0     |
| scalars        | smear_gate, smear_lambda, backout_lambda,      | 0.2                       | (0.8, 0.95)  | 0     |
|                | yatnmn c_fc bias / alpha / epsilon_param       |                           |              |       |
| muon           | every 2-D kernel inside `blocks` (ve_gate too) | 0.02, x sqrt(max(1,out/in)) | Nesterov m | 0.28 s |

w = (C/768)^-0.5 (width scaling); s = sqrt(B/2^19) * D_d12/D (scaling.weight_decay_scale). AdamW eps 1e-10,
decoupled decay (p <- p - lr (adam + wd p), as nanochat's p *= 1 - lr wd). Every lr follows
`schedules.lr_multiplier`; Muon's momentum and decay follow `muon_momentum` and `muon_weight_decay` (cosine
from 0.28 s at step 0). The AdamW decays are constants, as in nanochat (only Muon's `--weight-decay` is scaled
and scheduled there); their effective decay lr * wd still follows the lr schedule.

Choices this file makes where docs/architecture.md is silent:
- yatnmn's c_fc bias (4C,), alpha (1,) and eps_raw `epsilon_param` (1,) are not matrices: they join `scalars`
  (the non-matrix, zero-decay group of gates and gains like smear_lambda; no decay on biases and gains).
- Tied embeddings (no lm_head): the shared `wte` keeps the `wte` group's hyperparameters by default, as
  modded-nanogpt's tied records gave the tied matrix the embedding lr; `overrides={"tied_wte_group":
  "lm_head"}` gives it lm_head's instead.
- "every lr x sqrt(B/2^19)" (docs/architecture.md §Scaling): the scalars group (0.2) is scaled too.

`overrides` (all optional): {"<adamw group>": {"lr", "betas", "wd"}} (base values, before width and batch
scaling), {"muon": {"lr", "wd", "beta2", "ns_steps", "ns_dtype"}}, "warmup_steps", "warmdown_ratio",
"final_lr_frac", "ratio" (tokens:params ratio of the horizon, default scaling.DEFAULT_RATIO = 12; used for the
decay scaling), "tied_wte_group".
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from jaxchat.config import ModelConfig
from jaxchat.model.gpt import param_path
from jaxchat.optim import schedules
from jaxchat.optim.muon import muon
from jaxchat.optim.scaling import DEFAULT_RATIO, lr_scale, weight_decay_scale

ADAMW_GROUPS = ("lm_head", "wte", "value_embeds", "resid_lambdas", "x0_lambdas", "scalars")
GROUPS = ADAMW_GROUPS + ("muon",)

# Base hyperparameters (docs/architecture.md §Optimizer); `width` marks the (C/768)^-0.5 scaling.
ADAMW_BASE = {
    "lm_head": dict(lr=0.008, betas=(0.8, 0.96), wd=0.01, width=True),
    "wte": dict(lr=0.3, betas=(0.8, 0.995), wd=0.001, width=True),
    "value_embeds": dict(lr=0.15, betas=(0.8, 0.995), wd=0.01, width=True),
    "resid_lambdas": dict(lr=0.005, betas=(0.8, 0.95), wd=0.05, width=False),
    "x0_lambdas": dict(lr=0.5, betas=(0.96, 0.95), wd=0.0, width=False),
    "scalars": dict(lr=0.2, betas=(0.8, 0.95), wd=0.0, width=False),
}
MUON_BASE = dict(lr=0.02, wd=schedules.MUON_WEIGHT_DECAY, beta2=0.9, ns_steps=5, ns_dtype="bfloat16")
ADAMW_EPS = 1e-10
SCALAR_PARAMS = ("smear_gate", "smear_lambda", "backout_lambda",
                 "smear_v1_gate", "skip_weights", "resid_mix")  # the last three: golf switches (model/gpt.py)
GOLF_BLOCK_VECTORS = ("attn_scale", "mlp_scale", "q_gain")
BLOCK_VECTOR_PARAMS = ("bias", "alpha", "epsilon_param")  # yatnmn's c_fc extras
_TOP_KEYS = ("warmup_steps", "warmdown_ratio", "final_lr_frac", "ratio", "tied_wte_group")


class ParamGroupError(ValueError):
    """A parameter matches no optimizer group."""


def group_of(path: tuple[str, ...], shape: tuple[int, ...]) -> str:
    """The group of one parameter (see the module table); raises ParamGroupError naming the path."""
    top = path[0] if path else ""
    if top in ("lm_head", "wte", "value_embeds") or path in (("resid_lambdas",), ("x0_lambdas",)):
        return top
    if top in SCALAR_PARAMS:
        return "scalars"
    if top == "bigram":  # golf's BigramHash: its table learns like wte, its projection and scale like the gates
        return "wte" if path[1] == "embed" else "scalars"
    if top == "blocks":
        if len(shape) == 2:
            return "muon"
        if "mlp" in path and path[-1] in BLOCK_VECTOR_PARAMS or path[-1] in GOLF_BLOCK_VECTORS:
            return "scalars"
    raise ParamGroupError(
        f"parameter {'/'.join(path)} (shape {tuple(shape)}) belongs to no optimizer group: known are "
        f"{', '.join(GROUPS)}; add a rule for it in jaxchat/optim/groups.py:group_of")


def assign_groups(params_state):
    """Pytree of group labels (strings) with the structure of `params_state` (nnx State or plain dict; leaves
    may be arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map_with_path(lambda kp, x: group_of(param_path(kp), jnp.shape(x)), params_state)


def _check_overrides(overrides: dict | None) -> dict:
    o = dict(overrides or {})
    for k, v in o.items():
        if k in ADAMW_GROUPS:
            bad = set(v) - {"lr", "betas", "wd"}
        elif k == "muon":
            bad = set(v) - set(MUON_BASE)
        elif k in _TOP_KEYS:
            continue
        else:
            raise ValueError(f"optimizer override {k!r} is unknown: use a group ({', '.join(GROUPS)}) or one of "
                             f"{', '.join(_TOP_KEYS)}")
        if bad:
            raise ValueError(f"optimizer override {k}: unknown fields {sorted(bad)}")
    if o.get("tied_wte_group", "wte") not in ("wte", "lm_head"):
        raise ValueError(f"tied_wte_group={o['tied_wte_group']!r}: choose 'wte' or 'lm_head'")
    return o


def group_hparams(model_cfg: ModelConfig, batch_tokens: int, overrides: dict | None = None) -> dict[str, dict]:
    """Peak hyperparameters of every group after width and batch/depth scaling."""
    o = _check_overrides(overrides)
    width, s = (model_cfg.n_embd / 768) ** -0.5, lr_scale(batch_tokens)
    out = {}
    for name, base in ADAMW_BASE.items():
        h = {**base, **o.get(name, {})}
        out[name] = dict(kind="adamw", lr=h["lr"] * (width if base["width"] else 1.0) * s,
                         betas=tuple(h["betas"]), eps=ADAMW_EPS, wd=h["wd"])
    if model_cfg.tie_embeddings and o.get("tied_wte_group", "wte") == "lm_head":
        out["wte"] = dict(out["lm_head"])
    m = {**MUON_BASE, **o.get("muon", {})}
    out["muon"] = dict(kind="muon", lr=m["lr"] * s,
                       wd=m["wd"] * weight_decay_scale(model_cfg, batch_tokens, o.get("ratio", DEFAULT_RATIO)),
                       beta2=m["beta2"], ns_steps=m["ns_steps"], ns_dtype=m["ns_dtype"])
    return out


def nanochat_optimizer(params_state, model_cfg: ModelConfig, num_steps: int, batch_tokens: int,
                       overrides: dict | None = None) -> optax.GradientTransformation:
    """Muon + AdamW groups over `params_state` with nanochat's schedules over `num_steps` optimizer steps of
    `batch_tokens` tokens. Only groups present in `params_state` get a transform."""
    o = _check_overrides(overrides)
    hp = group_hparams(model_cfg, batch_tokens, o)
    present = set(jax.tree.leaves(assign_groups(params_state)))  # raises early on an unknown parameter
    sched = {k: o[k] for k in ("warmup_steps", "warmdown_ratio", "final_lr_frac") if k in o}
    lrm = lambda c: schedules.lr_multiplier(c, num_steps, **sched)  # noqa: E731
    wd_ratio = sched.get("warmdown_ratio", schedules.WARMDOWN_RATIO)
    transforms = {}
    for name in (g for g in GROUPS if g in present):
        h = hp[name]
        lr = lambda c, peak=h["lr"]: peak * lrm(c)  # noqa: E731
        if name == "muon":
            transforms[name] = muon(
                learning_rate=lr,
                momentum=lambda c: schedules.muon_momentum(c, num_steps, wd_ratio),
                weight_decay=lambda c, wd=h["wd"]: schedules.muon_weight_decay(c, num_steps, wd),
                ns_steps=h["ns_steps"], beta2=h["beta2"], ns_dtype=jnp.dtype(h["ns_dtype"]))
        else:
            transforms[name] = optax.adamw(lr, b1=h["betas"][0], b2=h["betas"][1], eps=h["eps"],
                                           weight_decay=h["wd"])
    return optax.multi_transform(transforms, assign_groups)


def describe_groups(params_state, model_cfg: ModelConfig, num_steps: int, batch_tokens: int,
                    overrides: dict | None = None) -> list[dict]:
    """One row per present group: group, kind, tensors, params, peak lr, betas, eps, wd (Muon: at step 0),
    schedule. For printing a run plan."""
    hp = group_hparams(model_cfg, batch_tokens, overrides)
    labels = jax.tree.leaves(assign_groups(params_state))
    sizes = [math.prod(jnp.shape(x)) for x in jax.tree.leaves(params_state)]
    o = _check_overrides(overrides)
    wd_iters = schedules.warmdown_iters(num_steps, o.get("warmdown_ratio", schedules.WARMDOWN_RATIO))
    lr_sched = (f"x lr_multiplier (warmup {o.get('warmup_steps', schedules.WARMUP_STEPS)}, "
                f"warmdown from step {num_steps - wd_iters} to {o.get('final_lr_frac', schedules.FINAL_LR_FRAC)})")
    rows = []
    for name in GROUPS:
        n = [s for lab, s in zip(labels, sizes) if lab == name]
        if not n:
            continue
        h = hp[name]
        row = dict(group=name, kind=h["kind"], tensors=len(n), params=sum(n), lr=h["lr"], wd=h["wd"])
        if name == "muon":
            row.update(betas=None, eps=1e-10, beta2=h["beta2"],
                       schedule=f"{lr_sched}; lr x sqrt(max(1, out/in)); momentum 0.85->0.97->0.90; "
                                f"wd cosine to 0")
        else:
            row.update(betas=h["betas"], eps=h["eps"], schedule=lr_sched)
        rows.append(row)
    return rows


__all__ = ["GROUPS", "ADAMW_GROUPS", "ParamGroupError", "assign_groups", "group_of", "group_hparams",
           "nanochat_optimizer", "describe_groups"]
