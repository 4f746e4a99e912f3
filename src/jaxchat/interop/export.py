"""Export a run's weights to safetensors, with a config.json that documents the architecture.

Output directory:
    model.safetensors   every parameter, fp32, named by its jaxchat parameter path joined with dots, e.g.
                        wte.embedding, blocks.0.attn.c_q.kernel, blocks.0.mlp.c_fc.kernel,
                        value_embeds.1.embedding, lm_head.kernel (untied only), resid_lambdas, smear_gate.kernel
    config.json         format, step, the full ModelConfig, derived facts (head_dim, padded vocab, window per
                        layer, value-embedding layers) and the layout conventions below
    tokenizer.json      the run's tokenizer, when it has one (tokenizer.model for a sentencepiece model)

Layout: dense kernels are (in, out) (y = x @ W; PyTorch's nn.Linear weight is the transpose); embeddings are
(padded_vocab, dim) with rows >= vocab_size unused; c_q columns are head-major (head h = columns h*D..h*D+D).
These names are stable: they are the keys of `jaxchat.model.gpt.param_dict`, flattened.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import numpy as np
from safetensors.numpy import save_file

from jaxchat.checkpoint import CheckpointError
from jaxchat.data.tokenizer import find_tokenizer_file
from jaxchat.fileio import write_json_atomic
from jaxchat.interop.common import path_str
from jaxchat.run import Run

FORMAT = "jaxchat-safetensors"
FORMAT_VERSION = 1
LAYOUT = {
    "names": "jaxchat parameter paths joined with '.', e.g. blocks.0.attn.c_q.kernel",
    "dense": "kernel (in, out): y = x @ kernel; the transpose of a PyTorch nn.Linear weight",
    "embedding": "(padded_vocab_size, dim); rows >= vocab_size are padding",
    "attention": "c_q (C, H*D), c_k/c_v (C, K*D), head-major columns; c_proj (H*D, C)",
    "norm": "parameter-free RMSNorm x * rsqrt(mean(x^2) + norm_eps); there are no norm weights",
    "forward": "jaxchat's docs/architecture.md §Forward (nanochat architecture): smear, x0/resid lambdas, "
               "value embeddings on value_embed_layers, RoPE then QK-norm * qk_scale, sliding windows, "
               "backout at derived.backout_layer, logits = logit_softcap * tanh(x @ W_out / logit_softcap), "
               "W_out = wte.T when tied",
}


def flat_params(params) -> dict[str, np.ndarray]:
    # (copy, not np.ascontiguousarray: that turns a 0-d parameter such as bigram.scale into shape (1,))
    return {path_str(p): np.asarray(v).copy(order="C") for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def read_params(run_dir: str | Path, step: int | None = None, weights: str = "raw") -> tuple[object, dict, int]:
    """(Config, params, step) of a run's checkpoint, on one device (the tokenizer is not needed); `weights`: the
    trained params (raw) or their EMA / SWA average (averaging.py)."""
    run = Run.load(run_dir, step, tokenizer=False)
    return run.cfg, run.weights(weights), int(run.state["step"])


def export_safetensors(run_dir: str | Path, out: str | Path, step: int | None = None, force: bool = False,
                       log=print, weights: str = "raw") -> Path:
    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file, not a directory: choose a directory for the export")
    if out.exists() and any(out.iterdir()) and not force:
        raise CheckpointError(f"--out {out} exists and is not empty: choose another directory or pass --force")
    cfg, params, step = read_params(run_dir, step, weights)
    tensors = flat_params(params)
    m = cfg.model
    doc = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "architecture": "nanochat-style GPT (jaxchat)",
        "source_run": str(run_dir.absolute()), "step": step, "weights": weights, "model": dataclasses.asdict(m),
        "derived": {"head_dim": m.head_dim, "padded_vocab_size": m.padded_vocab_size,
                    "window_sizes": list(m.window_sizes()),
                    "value_embed_layers": [i for i in range(m.n_layer) if m.has_value_embed(i)],
                    "backout_layer": m.backout_at if m.backout else None,
                    "num_parameters": int(sum(v.size for v in tensors.values()))},
        "layout": LAYOUT,
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in sorted(tensors.items())},
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"),
              metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION), "step": str(step),
                        "model": json.dumps(doc["model"], sort_keys=True)})
    write_json_atomic(out / "config.json", doc)
    tok_file = find_tokenizer_file(run_dir)  # tokenizer.json, or a sentencepiece tokenizer.model
    if tok_file is not None:
        shutil.copyfile(tok_file, out / tok_file.name)
    log(f"exported {len(tensors)} tensors ({doc['derived']['num_parameters']:,} parameters) of {run_dir} step "
        f"{step}" + (f" ({weights} weights)" if weights != "raw" else "") + f" to {out / 'model.safetensors'} (+ config.json"
        + (f", {tok_file.name})" if tok_file is not None else ")"))
    return out
