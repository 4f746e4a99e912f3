"""The planner: a config's horizon and batch rules turned into concrete numbers, and the plan a user checks before
paying (`jaxchat plan`). The one place these rules are applied; optim/scaling.py holds nanochat's formulas.

`resolve(cfg, devices)` returns a Config whose train.num_steps, batch_size and grad_accum are concrete:
- batch_size -1: nanochat's rule B = 2^round(log2(2^19 (D/D_d12)^0.383)) tokens (optim/scaling.py), in sequences;
- num_steps -1: target_flops / (flops_per_token * B) if set, else tokens_per_param * (all parameters) / B
  (marin's TPP) if set, else ratio * N / B (N = block matrices + lm_head);
- device_batch_size > 0: grad_accum = batch_size / (device_batch_size * devices);
and whose model.compute_dtype is concrete ("auto": bfloat16 on a GPU/TPU or a CPU with bf16 units, else float32).
"""

from __future__ import annotations

from dataclasses import replace

from jaxchat.config import Config, ConfigError
from jaxchat.dtypes import resolve_compute_dtype
from jaxchat.model.accounting import count, param_shapes
from jaxchat.optim import build_optimizer, golf, muon_overrides, scaling
from jaxchat.optim.groups import describe_groups
from jaxchat.optim.scaling import DEFAULT_RATIO


def resolve(cfg: Config, devices: int = 1) -> Config:
    t, m = cfg.train, cfg.model
    ratio = t.target_param_data_ratio if t.target_param_data_ratio > 0 else DEFAULT_RATIO
    batch = t.batch_size
    if batch == -1:
        tokens = scaling.auto_batch_tokens(m, ratio)
        if tokens % m.sequence_len:
            raise ConfigError(f"the automatic batch of {tokens:,} tokens is not a multiple of model.sequence_len="
                              f"{m.sequence_len}: set train.batch_size explicitly")
        batch = tokens // m.sequence_len
    steps = t.num_steps
    if steps == -1:
        if t.target_flops > 0:
            steps = round(t.target_flops / (count(m).flops["total"] * batch * m.sequence_len))
        elif t.tokens_per_param > 0:
            steps = int(t.tokens_per_param * count(m).params["total"]) // (batch * m.sequence_len)
        else:
            steps = scaling.target_tokens(m, ratio) // (batch * m.sequence_len)
        if steps < 1:
            raise ConfigError(f"the horizon gives {steps} steps: raise train.target_flops / tokens_per_param / the "
                              f"ratio, or set "
                              f"train.num_steps")
    accum = t.grad_accum
    if t.device_batch_size:
        per_step = t.device_batch_size * devices
        if batch % per_step:
            raise ConfigError(f"train.batch_size={batch} sequences is not a multiple of device_batch_size x devices "
                              f"= {t.device_batch_size} x {devices}: pick a device_batch_size dividing "
                              f"{batch // devices if batch % devices == 0 else batch}")
        accum = batch // per_step
    model = replace(m, compute_dtype=resolve_compute_dtype(m.compute_dtype))
    return replace(cfg, model=model, train=replace(t, num_steps=steps, batch_size=batch, grad_accum=accum))


def make_plan(cfg: Config, devices: int = 1) -> dict:
    """Everything `jaxchat plan` prints, for any preset (AdamW or the Muon recipe)."""
    r = resolve(cfg, devices)
    t, m = r.train, r.model
    batch_tokens = t.batch_size * m.sequence_len
    flops_per_token = count(m).flops["total"]
    plan = {"devices": devices, "batch_sequences": t.batch_size, "batch_tokens": batch_tokens,
            "device_batch_size": t.batch_size // t.grad_accum // devices, "grad_accum": t.grad_accum,
            "num_steps": t.num_steps, "tokens": batch_tokens * t.num_steps, "flops_per_token": flops_per_token,
            "total_flops": flops_per_token * batch_tokens * t.num_steps,
            "scaling_params": scaling.scaling_params(m), "optimizer": r.optim.optimizer}
    plan["tokens_per_scaling_param"] = plan["tokens"] / plan["scaling_params"]
    plan["tokens_per_param"] = plan["tokens"] / count(m).params["total"]
    if r.optim.optimizer == "golf":
        plan["groups"] = golf.describe(param_shapes(m), m, t.num_steps, muon_overrides(r))
    elif r.optim.optimizer == "muon":
        ratio = t.target_param_data_ratio if t.target_param_data_ratio > 0 else DEFAULT_RATIO
        plan["groups"] = describe_groups(param_shapes(m), m, t.num_steps, batch_tokens,
                                         {"ratio": ratio, **muon_overrides(r)})
    else:
        o = r.optim
        plan["groups"] = [{"group": "all", "kind": "adamw", "lr": o.lr, "betas": (o.b1, o.b2), "wd": o.weight_decay,
                           "params": count(m).params["total"]}]
    build_optimizer(r)  # the recipe must build for this model (raises on an unknown parameter group)
    return plan
