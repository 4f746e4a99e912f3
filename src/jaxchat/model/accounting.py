"""Parameter and FLOP counts (nanochat convention) and MFU, computed from shapes alone (no allocation).

FLOPs per token (training) = 6 * (every matmul weight: blocks, lm_head, value-embedding and smear gates, golf's
                               BigramHash projection, counted with the gates)
                           + sum over layers of 12 * H * D * min(window, T).
Embedding lookups (wte, value-embedding tables) cost no FLOPs. With tied embeddings the lm_head matmul still
costs its 6 * C * V: the same weight, used as a matmul.
MFU = flops_per_token * tokens_per_second / (peak_flops * devices).

Levanter's convention (`levanter_flops`, marin's speedrun reports; forward only, full s x s attention with no
causal halving or windows, gates and lambdas left out, F = MLP hidden width, V the true vocab):
    L * (2*2*C*F + 2*C*(H*D + 2*K*D) + 2*C*C) + L * s * (4*H*D + 3*H) + 2*C*V
(3*F for GLU MLPs: swiglu's gate is a third matrix). Run model FLOPs = 3 x that x tokens (`run_flops`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax
from flax import nnx

from jaxchat.config import ModelConfig
from jaxchat.model.gpt import GPT
from jaxchat.model.mlp import swiglu_hidden

# bf16 dense peak FLOP/s per device (docs/architecture.md §Counts).
PEAK_FLOPS = {
    "H100": 989.5e12, "H200": 989.5e12, "A100": 312e12,
    "TPU v6e": 918e12, "TPU v6 lite": 918e12, "TPU v5p": 459e12, "TPU v5e": 197e12, "TPU v5 lite": 197e12,
    "TPU v4": 275e12,
}


@functools.lru_cache(maxsize=32)
def param_shapes(cfg: ModelConfig) -> nnx.State:
    """The nnx.Param state of GPT(cfg) as ShapeDtypeStructs, from nnx.eval_shape: no memory is allocated. Cached:
    a plan asks for the same config's shapes several times (counts, scaling, optimizer groups)."""
    return nnx.state(nnx.eval_shape(lambda: GPT(cfg)), nnx.Param)


def param_group(path: tuple) -> str:
    """Which line of the parameter split a tensor belongs to."""
    if path[0] == "wte":
        return "embed"
    if path[0] == "value_embeds":
        return "value_embeds"
    if path[0] == "lm_head":
        return "lm_head"
    if path[0] == "bigram":  # golf's BigramHash (table, projection, scale) counts with the token embedding
        return "embed"
    if path[0] == "blocks":
        if len(path) == 3 or path[-1] == "q_gain":  # golf's attn_scale, mlp_scale, q_gain
            return "scalars"
        if path[3] == "ve_gate":
            return "ve_gates"
        return "attention" if path[2] == "attn" else "mlp"
    return "scalars"  # resid/x0 lambdas, smear gate and lambda, backout lambda; golf's resid_mix, skips, smear


@dataclass(frozen=True)
class Counts:
    params: dict  # split by group, plus "total"
    flops: dict  # per token, training: lm_head / mlp / attention (matmuls + scores) / gates, plus "total"


def count(cfg: ModelConfig) -> Counts:
    params: dict[str, int] = {}
    matmul = {"lm_head": 0, "mlp": 0, "attention": 0, "gates": 0}
    for path, v in nnx.to_flat_state(param_shapes(cfg)):
        path, shape = tuple(str(p) for p in path), v.shape
        g = param_group(path)
        n = math.prod(shape)
        params[g] = params.get(g, 0) + n
        if g in ("mlp", "attention") and len(shape) == 2:
            matmul[g] += n
        elif g == "ve_gates" or path[0] == "smear_gate":
            matmul["gates"] += n
        elif g == "lm_head":
            matmul["lm_head"] += n
        elif path[0] == "bigram" and path[1] == "proj":
            matmul["gates"] += n
    if cfg.tie_embeddings:
        matmul["lm_head"] += cfg.n_embd * cfg.padded_vocab_size
    params["total"] = sum(params.values())
    T = cfg.sequence_len
    attn_scores = sum(12 * cfg.n_head * cfg.head_dim * min(w, T) for w in cfg.window_sizes())
    flops = {k: 6 * v for k, v in matmul.items()}
    flops["attention"] += attn_scores
    flops["total"] = sum(flops.values())
    return Counts(params=params, flops=flops)


def levanter_flops(cfg: ModelConfig) -> dict:
    """Forward FLOPs per token in Levanter's `lm_flops_per_token` convention, split lm_head / mlp / attention."""
    C, L, H, K, D, s = cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.sequence_len
    F = swiglu_hidden(C) if cfg.mlp == "swiglu" else cfg.mlp_mult * C
    mlp = L * (2 * (3 if cfg.mlp == "swiglu" else 2) * C * F)
    attention = L * (2 * C * (H * D + 2 * K * D) + 2 * C * C) + L * s * (4 * H * D + 3 * H)
    lm_head = 2 * C * cfg.vocab_size
    return {"lm_head": lm_head, "mlp": mlp, "attention": attention, "total": lm_head + mlp + attention}


def run_flops(cfg: ModelConfig, tokens: int, step_seconds: float, chips: int, peak: float | None) -> dict:
    """Marin's run-level accounting: model FLOPs = 3 x Levanter forward FLOPs/token x tokens; hardware FLOPs =
    time spent in steps x chips x peak; MFU = model / hardware (None without a known peak)."""
    model = 3 * levanter_flops(cfg)["total"] * tokens
    hw = step_seconds * chips * peak if peak else None
    return {"levanter_model_flops": model, "hardware_flops": hw, "run_mfu": model / hw if hw else None}


def device_peak_flops(device: jax.Device | None = None) -> float | None:
    """Peak bf16 FLOP/s of a device from its kind, or None when unknown (e.g. CPU)."""
    device = device or jax.devices()[0]
    kind = getattr(device, "device_kind", "")
    for name, peak in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if name.lower() in kind.lower():
            return peak
    return None


def mfu(flops_per_token: float, tokens_per_second: float, peak: float | None, devices: int = 1) -> float | None:
    if not peak:
        return None
    return flops_per_token * tokens_per_second / (peak * devices)
