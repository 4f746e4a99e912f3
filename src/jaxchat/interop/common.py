"""Shared by every importer: name/shape-checked model building, the import report, optimizer-state mapping,
hub downloads, and writing the result as a normal jaxchat run directory."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxchat.checkpoint import Checkpointer
from jaxchat.config import Config, ConfigError, DataConfig, ModelConfig, TrainConfig
from jaxchat.overrides import apply_overrides
from jaxchat.data import Tokenizer
from jaxchat.fileio import write_json_atomic
from jaxchat.model.gpt import GPT, param_path
from jaxchat.model.init import assign
from jaxchat.optim import build_optimizer
from jaxchat.rundir import check_run_dir, lock_run_dir, start_run_dir


class InteropError(ValueError):
    """The given tensors do not fit the given config; the message lists what did not match."""


def path_str(path: tuple) -> str:
    """A parameter's path as one dotted name, e.g. blocks.0.attn.c_q.kernel."""
    return ".".join(param_path(path))


def model_from_lookup(cfg: ModelConfig, lookup: Callable[[tuple], np.ndarray | None], source: str,
                      unused: Callable[[], list[str]] | None = None) -> GPT:
    """Build GPT(cfg) whose every parameter comes from `lookup(path)` (already in our (in, out) layout).

    `lookup` returns None for a tensor the source does not have. Missing tensors and shape mismatches are
    collected and reported together, naming the source's tensors, so a wrong depth or MLP kind is obvious.
    """
    abstract = nnx.eval_shape(lambda: GPT(cfg))
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    problems, leaves = [], []
    for path, var in flat:
        arr = lookup(path)
        if arr is None:
            problems.append(f"missing {path_str(path)} {tuple(var.shape)}")
            leaves.append(None)
            continue
        arr = np.asarray(arr)
        if arr.shape != tuple(var.shape):
            problems.append(f"shape of {path_str(path)}: {source} has {arr.shape}, config needs {tuple(var.shape)}")
        leaves.append(arr)
    extra = unused() if unused is not None else []
    if extra:
        problems.append(f"{source} tensors the config has no place for: {', '.join(sorted(extra)[:12])}"
                        + (" ..." if len(extra) > 12 else ""))
    if problems:
        raise InteropError(
            f"{source} does not match the model config (n_layer={cfg.n_layer}, n_embd={cfg.n_embd}, "
            f"n_head={cfg.n_head}, n_kv_head={cfg.n_kv_head}, mlp={cfg.mlp}, "
            f"tie_embeddings={cfg.tie_embeddings}):\n  " + "\n  ".join(problems[:20])
            + "\nFix: pass the config the checkpoint was trained with (depth, widths, MLP kind, tying).")
    for (path, var), arr in zip(flat, leaves):
        assign(var, jnp.asarray(arr, jnp.float32))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


@dataclass
class ImportReport:
    """What an import did: tensors mapped (source name -> our name), ignored, inferred, and notes."""

    source: str
    mapped: list[tuple[str, str, tuple]] = field(default_factory=list)  # (source name, our name, shape)
    ignored: list[str] = field(default_factory=list)
    inferred: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    step: int = 0
    run_dir: str = ""

    def lines(self) -> list[str]:
        """Human summary; tensors that differ only in a layer index are grouped (`blocks.*.attn.c_q`)."""
        groups: dict[tuple, list] = {}
        for src, dst, shape in self.mapped:
            key = (re.sub(r"\.\d+\.", ".*.", src), re.sub(r"\.\d+\.", ".*.", dst))
            groups.setdefault(key, []).append(shape)
        values = sum(int(np.prod(s)) for _, _, s in self.mapped)
        out = [f"import {self.source}: mapped {len(self.mapped)} tensors ({values:,} values)"]
        for (src, dst), shapes in groups.items():
            arrow = "(same name)" if src == dst else f"-> {dst}"
            out.append(f"  {src:<44} {arrow} x{len(shapes)} {shapes[0]}")
        out.append("ignored: " + (", ".join(self.ignored) if self.ignored else "nothing"))
        for k, v in self.inferred.items():
            out.append(f"inferred {k} = {v}")
        out += [f"note: {n}" for n in self.notes]
        return out

    def to_dict(self) -> dict:
        return {"source": self.source, "step": self.step, "mapped": [[s, d, list(sh)] for s, d, sh in self.mapped],
                "ignored": self.ignored, "inferred": self.inferred, "notes": self.notes}


def flatten_tree(tree, strip=("value", "raw_value")) -> dict[str, np.ndarray]:
    """A restored pytree (nested dicts/lists) -> {dotted path: array}; nnx Variable wrappers (`.value`) dropped."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = list(param_path(path))
        while keys and keys[-1] in strip:
            keys.pop()
        out[".".join(keys)] = np.asarray(leaf)
    return out


def download_from_hub(repo: str, revision: str | None = None) -> Path:
    """Download a Hugging Face Hub repo snapshot and return its local directory."""
    try:  # imported here: huggingface_hub is optional (the jaxchat[hub] extra), needed only for --from-hub
        from huggingface_hub import snapshot_download
    except ImportError:
        raise InteropError("--from-hub needs the huggingface_hub package: pip install huggingface_hub "
                           "(or download the repo yourself and pass its local path)") from None
    try:
        return Path(snapshot_download(repo_id=repo, revision=revision))
    except Exception as e:  # network errors, missing repos, auth: all reported the same way
        raise InteropError(f"could not download {repo!r} from the Hugging Face Hub: {type(e).__name__}: {e}\n"
                           f"Fix: check the repo name and your network, or download it and pass the local path")


def map_adam_state(opt_state, moments: dict[str, tuple[np.ndarray, np.ndarray]], count: int, step: int,
                   report: ImportReport):
    """Fill every AdamW slot of our optax state from `moments` ({dotted param path: (mu, nu)}).

    ScaleByAdamState: mu/nu per parameter by path, count = the source's Adam count (the bias correction
    must continue from the number of updates the moments hold). Every other `count` (ScaleByScheduleState,
    inject_hyperparams, jaxchat's MuonState) is a schedule step and is set to `step`, so learning-rate, momentum
    and weight-decay schedules resume where the run was. Moments with no AdamW slot (e.g. block matrices under
    optim.optimizer=muon, whose Muon momenta start at zero) are reported as ignored."""
    used, missing = set(), []

    def fill(which):
        def one(path, x):
            name = path_str(path)
            if name not in moments:
                missing.append(name)
                return x
            used.add(name)
            arr = moments[name][which]
            if arr.shape != x.shape:
                raise InteropError(f"optimizer moment {name}: checkpoint has {arr.shape}, the model needs {x.shape}")
            return jnp.asarray(arr, x.dtype)
        return one

    def visit(node):
        if isinstance(node, optax.ScaleByAdamState):
            return node._replace(count=jnp.asarray(count, node.count.dtype),
                                 mu=jax.tree_util.tree_map_with_path(fill(0), node.mu),
                                 nu=jax.tree_util.tree_map_with_path(fill(1), node.nu))
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            kids = {f: visit(getattr(node, f)) for f in node._fields}
            if "count" in kids and "nu" not in kids:  # a step counter for schedules (not Adam bias correction)
                kids["count"] = jnp.asarray(step, jnp.asarray(kids["count"]).dtype)
            return type(node)(**kids)
        if isinstance(node, (tuple, list)):
            return type(node)(visit(c) for c in node)
        if isinstance(node, dict):
            return {k: visit(v) for k, v in node.items()}
        return node

    out = visit(opt_state)
    if not used:
        report.notes.append("jaxchat's optimizer has no AdamW moments to fill: optimizer state starts fresh")
    if missing:
        report.notes.append(f"{len(set(missing))} AdamW moment slots had no source moments and start at zero: "
                            + ", ".join(sorted(set(missing))[:6]))
    unused = sorted(set(moments) - used)
    if unused:
        report.ignored.append(f"optimizer moments with no AdamW slot here: {', '.join(unused[:6])}")
    return out


def load_user_tokenizer(path: str | None, vocab_size: int, report: ImportReport):
    """Load --tokenizer (a HF tokenizer.json or a sentencepiece .model) and check it fits the model's vocab; None
    when not given."""
    if not path:
        return None
    try:
        tok = Tokenizer.load(path)
    except (OSError, ValueError) as e:
        raise InteropError(f"--tokenizer {path}: {e}") from None
    if tok.vocab_size > vocab_size:
        raise InteropError(f"--tokenizer {path} has {tok.vocab_size} tokens but the checkpoint's vocab is "
                           f"{vocab_size}: this is not the tokenizer the checkpoint was trained with")
    try:
        _ = tok.bos_id
    except ValueError as e:
        report.notes.append(f"tokenizer: {e} (eval, sample and train need a BOS token)")
    return tok



def reference_config(config, fallback, parse, what: str, missing: str) -> ModelConfig:
    """The ModelConfig of a reference model's keyword arguments: `config` as given (JSON text, a JSON file's
    path, or a dict), else `fallback` (what the checkpoint itself carries), parsed by `parse`; `missing` is the
    message when there is neither."""
    if config is None:
        config = fallback
        if config is None:
            raise InteropError(missing)
    elif isinstance(config, str) and not config.lstrip().startswith("{"):
        config = Path(config).read_text()
    try:
        return parse(config)
    except (ConfigError, TypeError, ValueError) as e:
        raise InteropError(f"{what} config {config!r:.200}: {e}") from None

def write_run(out: str | Path, model_cfg: ModelConfig, params: dict, opt_moments, step: int, tokenizer,
              report: ImportReport, overrides: list[str] = (), force: bool = False, log=print) -> Path:
    """Write a jaxchat run directory (config.json, tokenizer.json, checkpoints/<step>, import.json).

    `opt_moments` is (moments, adam_count) to fill the AdamW state, or None for a fresh optimizer state.
    data.tokenizer_path points at the run's own tokenizer.json, so eval and `train --resume` re-tokenize the
    corpus with the checkpoint's tokenizer; without --tokenizer that file is absent and they say so."""
    out = Path(out).absolute()
    check_run_dir(out, resume=False, force=force, flag="--out")
    tok_file = out / (tokenizer.file_name if tokenizer is not None else "tokenizer.json")  # (.model: sentencepiece)
    data = DataConfig(tokenizer_path=str(tok_file),
                      tokenizer_vocab=tokenizer.vocab_size if tokenizer else model_cfg.vocab_size)
    cfg = Config(model=model_cfg, data=data, train=TrainConfig(num_steps=max(step, 1)))
    cfg = apply_overrides(cfg, list(overrides))
    if cfg.model != model_cfg:
        raise InteropError("--set may not change model.* on import: the checkpoint fixes the architecture "
                           "(pass --config instead)")

    optimizer = build_optimizer(cfg, None)
    params = jax.tree.map(jnp.asarray, params)
    opt_state = optimizer.init(params)
    if opt_moments is None:
        opt_state = map_adam_state(opt_state, {}, 0, step, ImportReport(report.source))
        report.notes.append("optimizer state: fresh (zero AdamW moments), schedule positioned at step "
                            f"{step}")
    else:
        moments, count = opt_moments
        opt_state = map_adam_state(opt_state, moments, count, step, report)
    state = {"params": params, "opt_state": opt_state, "step": jnp.int32(step), "skipped": jnp.int32(0)}

    lock = lock_run_dir(out) if out.is_dir() else None  # a run another process is training is never cleared
    try:
        start_run_dir(out, force, "import", log, flag="--out")
    finally:
        if lock is not None:
            os.close(lock)
    write_json_atomic(out / "config.json", cfg.to_dict())
    if tokenizer is not None:
        tokenizer.save(tok_file)
    else:
        report.notes.append(f"no --tokenizer: {tok_file} is absent, so eval/sample/train --resume will stop "
                            f"until you copy the checkpoint's HF tokenizer.json there")
    ckpt = Checkpointer(out, async_save=False)
    ckpt.save(step, state, {"config": cfg.to_dict(), "imported_from": report.source})
    ckpt.close()
    report.step, report.run_dir = step, str(out)
    write_json_atomic(out / "import.json", report.to_dict())
    for line in report.lines():
        log(line)
    log(f"wrote jaxchat run {out} at step {step}; continue training with: jaxchat train --run-dir {out} "
        f"--resume --set train.num_steps=<N>")
    return out
