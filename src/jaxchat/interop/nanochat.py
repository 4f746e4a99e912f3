"""nanochat (PyTorch) state dicts -> jaxchat GPT.

nanochat stores Linear weights as (out, in); jaxchat kernels are (in, out), so every matrix is transposed.
Embeddings (wte, value_embeds) keep their (vocab, dim) layout. nanochat's RMSNorm eps is the fp32 machine
epsilon, which is jaxchat's default.
"""

from __future__ import annotations

import json

import numpy as np

from jaxchat.config import ModelConfig
from jaxchat.interop.common import model_from_lookup
from jaxchat.model.gpt import GPT

_GPT_CONFIG_KEYS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "window_pattern")


def config_from_nanochat(gpt_config: dict | str, **overrides) -> ModelConfig:
    """nanochat's GPTConfig (dict or its JSON) -> ModelConfig with nanochat's defaults for everything else."""
    d = json.loads(gpt_config) if isinstance(gpt_config, str) else dict(gpt_config)
    kw = {k: d[k] for k in _GPT_CONFIG_KEYS if k in d}
    kw.update(overrides)
    return ModelConfig(**kw)


def nanochat_name(path: tuple) -> tuple[str, bool]:
    """Our parameter path -> (nanochat state-dict name, transpose?)."""
    p = [str(x) for x in path]
    if p[0] == "wte":
        return "transformer.wte.weight", False
    if p[0] == "value_embeds":
        return f"value_embeds.{p[1]}.weight", False
    if p[0] == "blocks":
        return f"transformer.h.{p[1]}.{p[2]}.{p[3]}.weight", True
    if p[0] in ("lm_head", "smear_gate"):
        return f"{p[0]}.weight", True
    return p[0], False  # resid_lambdas, x0_lambdas, smear_lambda, backout_lambda


def model_from_state_dict(state: dict, config: dict | str | ModelConfig) -> GPT:
    """Build a jaxchat GPT from a nanochat state dict (name -> array, PyTorch layout) and its GPTConfig."""
    cfg = config if isinstance(config, ModelConfig) else config_from_nanochat(config)
    return map_state_dict(state, cfg, "nanochat state dict")[0]


def map_state_dict(state: dict, cfg: ModelConfig, what: str) -> tuple[GPT, dict, dict]:
    """(model, the fp32 state without torch.compile's `_orig_mod.` prefix, {nanochat name: jaxchat path}) of a
    nanochat state dict; `what` names it in errors (missing or unused tensors)."""
    state = {k.removeprefix("_orig_mod."): np.asarray(v, np.float32) for k, v in state.items()}
    used = {}

    def lookup(path):
        name, transpose = nanochat_name(path)
        if name not in state:
            return None
        used[name] = ".".join(map(str, path)) + (" [transposed]" if transpose else "")
        return state[name].T if transpose else state[name]

    return model_from_lookup(cfg, lookup, what, lambda: sorted(set(state) - set(used))), state, used
