"""parameter-golf (PR #334's `GPT`, PyTorch) state dicts -> jaxchat GPT.

The reference's `GPT(...)` keyword arguments map onto ModelConfig's golf switches (docs/architecture.md §Golf):
its model is always the U-Net of golf blocks with SmearGate v1, QK-norm before RoPE, per-head q_gain, full
causal attention, and none of nanochat's extras (scalar lambdas, nanochat smear, backout, value embeddings).
Linear weights are (out, in) there and (in, out) here, so they are transposed; the per-block `resid_mix` (2, C)
tensors are stacked into our (L, 2, C) `resid_mix`. RMSNorm eps is PyTorch's default for fp32 (2^-23), ours.

`jaxchat import golf STATE --config JSON --out RUN` (`import_golf`) writes such a state dict (an .npz of
`param/<name>` or plain `<name>` arrays, or a .pt with torch) as a jaxchat run; golf's optimizer state is not
read (the run starts a fresh one).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jaxchat.config import ModelConfig
from jaxchat.interop.common import (ImportReport, InteropError, load_user_tokenizer, model_from_lookup,
                                    reference_config, write_run)
from jaxchat.interop.nanochat_files import read_state
from jaxchat.model.gpt import GPT, param_dict

_REQUIRED = ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads", "mlp_mult", "tie_embeddings")


def config_from_golf(kwargs: dict | str, sequence_len: int = 1024, **overrides) -> ModelConfig:
    """The reference GPT's keyword arguments (dict or JSON) -> ModelConfig. `sequence_len` is not one of them
    (the reference takes it from its Hyperparameters; a `sequence_len` key in `kwargs` wins); attention is full
    causal up to it."""
    d = json.loads(kwargs) if isinstance(kwargs, str) else dict(kwargs)
    sequence_len = d.get("sequence_len", sequence_len)
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
        raise ValueError(f"golf GPT config lacks {', '.join(missing)}: give the reference GPT(...) keyword arguments")
    kw = dict(
        vocab_size=d["vocab_size"], sequence_len=sequence_len, n_layer=d["num_layers"], n_embd=d["model_dim"],
        n_head=d["num_heads"], n_kv_head=d["num_kv_heads"], mlp="relu2", mlp_mult=d["mlp_mult"],
        tie_embeddings=d["tie_embeddings"], embed_init_std=d.get("tied_embed_init_std", 0.005),
        logit_softcap=d.get("logit_softcap", 30.0), rope_base=d.get("rope_base", 10000.0),
        rope_dims=d.get("rope_dims", 0), q_gain=d.get("qk_gain_init", 1.5), ln_scale=d.get("ln_scale", False),
        bigram_buckets=d.get("bigram_vocab_size", 0), bigram_dim=d.get("bigram_dim", 128),
        window_pattern="L", qk_scale=1.0, qk_norm_before_rope=True, smear_v1=True, unet=True, golf_block=True,
        smear=False, backout=False, value_embeds=False, residual_lambdas=False, init="golf_ortho")
    if kw["rope_dims"] == kw["n_embd"] // kw["n_head"]:
        kw["rope_dims"] = 0  # the reference rotates every dim then: the same model
    kw.update(overrides)
    return ModelConfig(**kw)


def golf_name(path: tuple) -> tuple[str, bool]:
    """Our parameter path -> (reference state-dict name, transpose?). `resid_mix` is stacked from blocks.*."""
    p = [str(x) for x in path]
    if p[0] == "wte":
        return "tok_emb.weight", False
    if p[0] == "lm_head":
        return "lm_head.weight", True
    if p[0] == "smear_v1_gate":
        return "smear.gate", False
    if p[0] == "bigram":
        return ("bigram.proj.weight", True) if p[1] == "proj" else (f"bigram.{p[1]}" + (".weight" if p[1] == "embed" else ""), False)
    if p[0] == "blocks":
        if len(p) == 3:  # attn_scale, mlp_scale
            return f"blocks.{p[1]}.{p[2]}", False
        if p[3] == "q_gain":
            return f"blocks.{p[1]}.attn.q_gain", False
        part = {"c_proj": "proj", "c_fc": "fc"}.get(p[3], p[3])
        return f"blocks.{p[1]}.{p[2]}.{part}.weight", True
    return p[0], False  # skip_weights


def model_from_state_dict(state: dict, config: dict | str | ModelConfig) -> GPT:
    """A jaxchat GPT from a PR #334 state dict (name -> array, PyTorch layout, `_orig_mod.` prefixes allowed) and
    the reference GPT's keyword arguments; calling it on idx (B, T) gives fp32 logits (B, T, V)."""
    cfg = config if isinstance(config, ModelConfig) else config_from_golf(config)
    return map_state_dict(state, cfg)[0]


def map_state_dict(state: dict, cfg: ModelConfig) -> tuple[GPT, dict, dict]:
    """(model, the fp32 state without `_orig_mod.` prefixes, {reference name: our path}) of a golf state dict."""
    state = {k.removeprefix("_orig_mod."): np.asarray(v, np.float32) for k, v in state.items()}
    used = {}

    def lookup(path):
        if path[0] == "resid_mix":
            names = [f"blocks.{i}.resid_mix" for i in range(cfg.n_layer)]
            if not all(n in state for n in names):
                return None
            used.update({n: f"resid_mix[{i}]" for i, n in enumerate(names)})
            return np.stack([state[n] for n in names])
        name, transpose = golf_name(path)
        if name not in state:
            return None
        used[name] = ".".join(map(str, path)) + (" [transposed]" if transpose else "")
        arr = state[name].T if transpose else state[name]
        if name == "tok_emb.weight" and arr.shape[0] < cfg.padded_vocab_size:  # our table is padded to 64 rows
            arr = np.pad(arr, ((0, cfg.padded_vocab_size - arr.shape[0]), (0, 0)))
        return arr

    model = model_from_lookup(cfg, lookup, "golf state dict", lambda: sorted(set(state) - set(used)))
    return model, state, used


def import_golf(path: str | Path, out: str | Path, config: str | dict | None = None, tokenizer: str | None = None,
                overrides: list[str] = (), force: bool = False, log=print) -> ImportReport:
    """Read a golf state dict (.npz, or .pt with torch) and write it as a jaxchat run. `config`: the reference
    GPT's keyword arguments (JSON text, a JSON file, or a dict); without it, the npz's own `config` entry."""
    path = Path(path)
    if not path.is_file():
        raise InteropError(f"{path} is not a file: pass a golf state dict (.npz with param/<name> arrays, or .pt)")
    report = ImportReport(source=f"golf {path}")
    state, embedded = read_state(path)
    cfg = reference_config(config, embedded, config_from_golf, "golf",
                           f"no model config for {path}: pass --config with the reference GPT(...) keyword "
                           f"arguments as JSON, e.g. '{{\"vocab_size\": 1024, \"num_layers\": 11, ...}}'")
    tok = load_user_tokenizer(tokenizer, cfg.vocab_size, report)
    model, state, used = map_state_dict(state, cfg)
    report.mapped = [(n, used[n], state[n].shape) for n in sorted(used)]
    report.notes.append("golf conventions: (out, in) matrices transposed to (in, out), blocks.*.resid_mix stacked "
                        "into resid_mix (L, 2, C), RMSNorm eps = fp32 machine epsilon, tied embeddings as given")
    write_run(out, cfg, param_dict(model), None, 0, tok, report, overrides, force, log)
    return report
