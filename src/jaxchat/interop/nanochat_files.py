"""nanochat checkpoint files -> a jaxchat run.

nanochat's checkpoint manager writes, per step N (6 digits), into one directory:
    model_N.pt          the model state dict (PyTorch tensors, Linear weights (out, in), often bf16)
    meta_N.json         {"step": ..., "model_config": GPTConfig kwargs, "val_bpb": ..., "user_config": ...}
    optim_N_rankR.pt    the Muon + AdamW optimizer state, sharded by rank
Reading `.pt` needs PyTorch (the optional `torch` extra). Without it, the npz state-dict form is read: an
`.npz` with `param/<state-dict name>` arrays and a `config` JSON string (nanochat's GPTConfig), e.g. the
parity fixture nanochat_tiny.npz; a `model_N.npz` beside a `meta_N.json` works too.

Names and layouts are mapped by `interop.nanochat.nanochat_name` (matrices transposed to (in, out)).
nanochat's optimizer (Muon for block matrices, several AdamW groups) has no counterpart in jaxchat's AdamW,
so the imported run starts with a fresh optimizer state; nanochat's tokenizer is a tiktoken pickle, so pass
the matching HF tokenizer.json with --tokenizer.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np

from jaxchat.interop.common import ImportReport, InteropError, load_user_tokenizer, reference_config, write_run
from jaxchat.interop.nanochat import config_from_nanochat, map_state_dict
from jaxchat.model.gpt import param_dict

_MODEL_FILE = re.compile(r"model_(\d+)\.(pt|npz)$")


def _have_torch() -> bool:
    return importlib.util.find_spec("torch") is not None  # without importing it (seconds)


def find_checkpoint(path: str | Path, step: int | None = None) -> tuple[Path, int | None]:
    """The model file to read (`.npz` or `.pt`) and its step, from a file or a checkpoint directory."""
    path = Path(path)
    if path.is_file():
        m = _MODEL_FILE.search(path.name)
        return path, int(m.group(1)) if m else None
    if not path.is_dir():
        raise InteropError(f"{path} does not exist: pass a nanochat checkpoint directory (model_*.pt + meta_*.json) "
                           f"or an .npz state dict")
    found = {}
    for f in sorted(path.rglob("model_*")):
        m = _MODEL_FILE.search(f.name)
        if m:
            found.setdefault(int(m.group(1)), []).append(f)
    if not found:
        npz = sorted(path.rglob("*.npz"))
        if len(npz) == 1 and step is None:
            return npz[0], None
        raise InteropError(f"no nanochat checkpoint in {path}: expected model_<step>.pt (or .npz) files"
                           + (f"; found several .npz: {[p.name for p in npz]}" if npz else ""))
    if step is not None and step not in found:
        raise InteropError(f"--step {step}: {path} has steps {sorted(found)}")
    step = max(found) if step is None else step
    files = sorted(found[step], key=lambda f: (f.suffix == ".pt") == _have_torch(), reverse=True)
    return files[0], step


def read_state(file: Path) -> tuple[dict[str, np.ndarray], str | None]:
    """(state dict name -> fp32 array, the embedded config JSON or None)."""
    if file.suffix == ".npz":
        d = np.load(file)
        state = {k.removeprefix("param/"): d[k] for k in d.files if k.startswith("param/")}
        if not state:  # a plain npz of name -> array
            state = {k: d[k] for k in d.files if k != "config"}
        return state, (str(d["config"]) if "config" in d.files else None)
    if not _have_torch():
        raise InteropError(f"reading {file.name} needs PyTorch, which is not installed: pip install torch "
                           f"(the jaxchat[torch] extra), or convert the checkpoint to the npz form "
                           f"(numpy.savez(path, config=json, **{{'param/'+k: v.float().numpy()}}))")
    import torch  # imported here: PyTorch is optional (the jaxchat[torch] extra), needed only for .pt files

    sd = torch.load(file, map_location="cpu", weights_only=True)
    sd = sd.get("model", sd) if isinstance(sd, dict) else sd
    return {k: v.detach().float().numpy() for k, v in sd.items() if hasattr(v, "detach")}, None


def read_meta(file: Path, step: int | None) -> dict:
    if step is None:
        return {}
    meta = file.parent / f"meta_{step:06d}.json"
    return json.loads(meta.read_text()) if meta.is_file() else {}


def import_nanochat(path: str | Path, out: str | Path, step: int | None = None, tokenizer: str | None = None,
                    config: str | dict | None = None, overrides: list[str] = (), force: bool = False,
                    log=print) -> ImportReport:
    """Read a nanochat checkpoint (.pt with torch, or the npz form) and write it as a jaxchat run."""
    file, step = find_checkpoint(path, step)
    report = ImportReport(source=f"nanochat {file}")
    state, embedded = read_state(file)
    meta = read_meta(file, step)
    cfg = reference_config(config, meta.get("model_config") or embedded, config_from_nanochat, "nanochat",
                           f"no model config for {file}: expected meta_{(step or 0):06d}.json beside it (with "
                           f"model_config) or a `config` entry in the npz; or pass --config")
    tok = load_user_tokenizer(tokenizer, cfg.vocab_size, report)
    model, state, used = map_state_dict(state, cfg, f"nanochat checkpoint {file.name}")
    report.mapped = [(n, used[n], state[n].shape) for n in sorted(used)]
    optim = sorted(file.parent.glob(f"optim_{step:06d}_rank*.pt")) if step is not None else []
    if optim:
        report.ignored.append(f"{', '.join(f.name for f in optim)} (nanochat's Muon+AdamW state has no "
                              f"counterpart in jaxchat's AdamW)")
    extra = sorted(k for k in meta if k not in ("model_config", "step"))
    if extra:
        report.ignored.append(f"meta keys {', '.join(extra)}")
    report.notes.append("nanochat conventions: (out, in) matrices transposed to (in, out), RMSNorm eps = fp32 "
                        "machine epsilon, relu2 MLP, untied lm_head")
    step = int(meta.get("step", step or 0))
    write_run(out, cfg, param_dict(model), None, step, tok, report, overrides, force, log)
    return report
