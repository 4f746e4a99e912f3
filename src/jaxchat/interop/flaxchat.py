"""flaxchat (mlnomadpy/flaxchat) Orbax checkpoints -> a jaxchat run.

A flaxchat step directory (as on the flaxchat model cards) holds `model/` (nnx.to_pure_dict of the GPT's
state, Orbax PyTree), `optimizer/` (the optax state of its nnx.Optimizer, every leaf wrapped as {'value': x}),
`metadata/` (JSON, e.g. {"final_loss": ...}) and `_CHECKPOINT_METADATA`.

Parameters. flaxchat's GPT is a port of nanochat with the same module names as jaxchat, and both keep
Linear kernels (in, out) and embeddings (vocab, dim), so the mapping is name-for-name with no transposes:
    ('blocks','0','attn','c_q','kernel') -> blocks.0.attn.c_q.kernel   (C, H*D): head h is columns h*D..h*D+D
    ('wte','embedding') -> wte.embedding (padded vocab, C); tied embeddings: no lm_head, logits = x @ wte.T
    ('value_embeds','1','embedding'), ('smear_gate','kernel'), resid_lambdas, x0_lambdas, smear_lambda, ...
    YatNMN MLPs (nmn): c_fc.kernel, c_fc.bias, c_fc.alpha (+ c_fc.epsilon_param for yatnmn_softplus).
Conventions that differ from jaxchat's defaults: RMSNorm eps is 1e-6 (set in the config), the vocab is
padded to a multiple of 64 (as ours). Everything else (RoPE base 1e5 split halves, QK norm x1.2, softcap 15,
window sizes, value-embedding layers, smear, backout at L//2) matches docs/architecture.md §Forward.

Optimizer. The seed cards' "plain AdamW" state is the optax chain tuple
    [ScaleByAdamState{count, mu, nu}, <add_decayed_weights: empty>, <scale_by_learning_rate: empty or count>]
with mu/nu shaped like the parameter tree. jaxchat's optimizer is chain(clip_by_global_norm, adamw(schedule)),
whose ScaleByAdamState has the same mu/nu tree: the moments are copied by parameter path, the Adam count
(bias correction) is kept, and jaxchat's schedule counter is set to the checkpoint's step. The empty states
carry nothing; any other optimizer leaves (e.g. Muon momenta of flaxchat's Muon+AdamW) are reported ignored.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxchat.config import ConfigError, ModelConfig
from jaxchat.interop.common import (ImportReport, InteropError, flatten_tree, load_user_tokenizer, model_from_lookup,
                                    path_str, write_run)
from jaxchat.model.gpt import param_dict

MLP_CHOICES = ("gelu", "relu2", "yatnmn", "yatnmn_softplus")
GPT_CONFIG_KEYS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "window_pattern",
                   "tie_embeddings")
FLAXCHAT_DEFAULTS = {"sequence_len": 2048, "window_pattern": "SSSL"}  # flaxchat GPTConfig defaults
FLAXCHAT_NORM_EPS = 1e-6


def find_step_dir(path: str | Path, step: int | None = None) -> Path:
    """`path` itself when it holds model/, else its numeric subdirectory `step` (default: the latest)."""
    path = Path(path)
    if (path / "model").is_dir() and step is None:
        return path
    steps = sorted(int(p.name) for p in path.glob("*") if p.name.isdigit() and (p / "model").is_dir()) \
        if path.is_dir() else []
    if step is not None and step in steps:
        return path / str(step)
    if steps and step is None:
        return path / str(steps[-1])
    raise InteropError(f"{path} is not a flaxchat checkpoint step directory (expected model/, optimizer/, "
                       f"metadata/ inside it" + (f"; steps found: {steps}" if steps else "") + ")")


def _restore(item: Path):
    """Restore an Orbax PyTree item as numpy arrays on the host, ignoring the writer's device sharding."""
    meta = ocp.PyTreeCheckpointHandler().metadata(item)
    tree = meta.tree if hasattr(meta, "tree") else meta
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    try:
        return ocp.PyTreeCheckpointer().restore(item, args=ocp.args.PyTreeRestore(restore_args=args))
    except Exception as e:  # orbax raises many types for unreadable checkpoints
        raise InteropError(f"could not read the Orbax item {item}: {type(e).__name__}: {str(e)[:300]}") from None


def read_checkpoint(step_dir: Path, optimizer: bool = True) -> tuple[dict, object, dict]:
    """(flat model params {dotted name: array}, the raw optimizer tree or None, metadata JSON)."""
    params = flatten_tree(_restore(step_dir / "model"))
    opt = _restore(step_dir / "optimizer") if optimizer and (step_dir / "optimizer").is_dir() else None
    meta = {}
    for f in sorted((step_dir / "metadata").glob("*")) if (step_dir / "metadata").is_dir() else []:
        try:
            meta.update(json.loads(f.read_text()))
        except (ValueError, UnicodeDecodeError, IsADirectoryError):
            pass
    return params, opt, meta


def parse_config(value: str | dict | None) -> dict:
    """--config: a flaxchat GPTConfig JSON (file path or inline), or a full config with a `model` section."""
    if value is None:
        return {}
    if isinstance(value, str):
        text = value if value.lstrip().startswith("{") else None
        if text is None:
            p = Path(value)
            if not p.is_file():
                raise InteropError(f"--config {value!r} is neither inline JSON nor an existing file")
            text = p.read_text()
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise InteropError(f"--config is not valid JSON: {e}") from None
    for key in ("model", "model_config", "resolved_config", "gpt_config"):
        if isinstance(value.get(key), dict):
            value = {**value, **value[key]}
    return value


def detect_mlp(flat: dict) -> tuple[str, ...]:
    """MLP kinds consistent with layer 0's MLP tensor names (relu2 and gelu hold the same tensors)."""
    names = {k.split(".mlp.", 1)[1] for k in flat if k.startswith("blocks.0.mlp.")}
    if "c_fc.epsilon_param" in names:
        return ("yatnmn_softplus",)
    if "c_fc.bias" in names or "c_fc.alpha" in names:
        return ("yatnmn",)
    return ("relu2", "gelu")


def infer_config(flat: dict, given: dict, mlp: str, report: ImportReport) -> ModelConfig:
    """ModelConfig from the given GPTConfig keys, the rest read off the tensor shapes (recorded in report)."""
    def need(name):
        if name not in flat:
            raise InteropError(f"the checkpoint has no {name}: not a flaxchat GPT (tensors: "
                               f"{', '.join(sorted(flat)[:8])} ...)")
        return flat[name].shape

    V, C = need("wte.embedding")
    q_dim, kv_dim = need("blocks.0.attn.c_q.kernel")[1], need("blocks.0.attn.c_k.kernel")[1]
    gates = [v.shape[1] for k, v in flat.items() if k.endswith("attn.ve_gate.kernel")]
    if gates:
        K = gates[0]
        D = kv_dim // K
        how = "from ve_gate (12, n_kv_head) and c_k"
    else:  # no value embeddings: head_dim cannot be seen in the shapes; flaxchat's depth dial uses 128
        D = 128 if q_dim % 128 == 0 else 64
        K = kv_dim // D
        how = "assuming head_dim 128 (flaxchat's from_depth) as no ve_gate shows n_kv_head"
    seen = {"n_layer": len({k.split(".")[1] for k in flat if k.startswith("blocks.")}), "n_embd": int(C),
            "n_head": int(q_dim // D), "n_kv_head": int(K), "vocab_size": int(V),
            "tie_embeddings": "lm_head.kernel" not in flat}
    checkable = ["n_layer", "n_embd", "tie_embeddings"] + (["n_head", "n_kv_head"] if gates else [])
    clash = [f"{k}={given[k]!r} but the checkpoint's shapes say {seen[k]!r}" for k in checkable
             if k in given and given[k] != seen[k]]
    if "vocab_size" in given and -(-int(given["vocab_size"]) // 64) * 64 != V:
        clash.append(f"vocab_size={given['vocab_size']} pads to {-(-int(given['vocab_size']) // 64) * 64} rows "
                     f"but wte has {V}")
    if clash:
        raise InteropError("the given config does not match the checkpoint: " + "; ".join(clash)
                           + ". Fix: pass the GPTConfig the checkpoint was trained with, or omit the wrong keys "
                             "to read them off the shapes")
    kw = {}
    for key in GPT_CONFIG_KEYS:
        if key in given:
            kw[key] = given[key]
        elif key in seen:
            kw[key] = seen[key]
            report.inferred[key] = f"{seen[key]} (from the shapes{', ' + how if key.endswith('head') else ''})"
        else:
            kw[key] = FLAXCHAT_DEFAULTS[key]
            report.inferred[key] = f"{kw[key]} (flaxchat default; not visible in a checkpoint, pass --config)"
    standard = bool(given.get("standard_gpt", False))
    flags = {"residual_lambdas": "resid_lambdas" in flat, "smear": "smear_gate.kernel" in flat,
             "backout": "backout_lambda" in flat, "value_embeds": any(k.startswith("value_embeds.") for k in flat)}
    for k, present in flags.items():
        if not present or standard:
            kw[k] = False
            report.notes.append(f"{k} off: the checkpoint has no such tensors (flaxchat standard_gpt)")
    try:
        return ModelConfig(**kw, mlp=mlp, norm_eps=FLAXCHAT_NORM_EPS)
    except (ConfigError, TypeError) as e:
        raise InteropError(f"the checkpoint's shapes and --config give an invalid model config: {e}") from None


def _adam_moments(opt_tree, report: ImportReport) -> tuple[dict, int] | None:
    """Every Adam state {count, mu, nu} in the optimizer tree -> ({param: (mu, nu)}, count)."""
    flat = flatten_tree(opt_tree)
    roots = {tuple(p[:p.index("mu")]) for p in (k.split(".") for k in flat) if "mu" in p}
    moments, counts, used = {}, [], set()
    for root in sorted(roots):
        pre = "".join(f"{r}." for r in root)
        mu_pre, nu_pre, cnt = f"{pre}mu.", f"{pre}nu.", f"{pre}count"
        if cnt not in flat:
            continue
        counts.append(int(flat[cnt]))
        used.add(cnt)
        for k, v in flat.items():
            if k.startswith(mu_pre) and f"{nu_pre}{k[len(mu_pre):]}" in flat:
                name = k[len(mu_pre):]
                moments[name] = (v, flat[f"{nu_pre}{name}"])
                used.update({k, f"{nu_pre}{name}"})
    other = sorted(set(flat) - used)
    if isinstance(opt_tree, (list, tuple)):
        empty = [f"optimizer[{i}]" for i, x in enumerate(opt_tree) if x is None or x == {} or x == []]
        if empty:
            report.ignored.append(f"{', '.join(empty)} (empty optax states: weight decay, learning-rate scale)")
    if other:
        report.ignored.append(f"optimizer leaves that are not AdamW moments: {', '.join(other[:6])}"
                              + (" ..." if len(other) > 6 else ""))
    if not moments:
        report.notes.append("the optimizer state holds no AdamW moments (count/mu/nu): optimizer starts fresh")
        return None
    if len(set(counts)) > 1:
        report.notes.append(f"Adam groups have different counts {sorted(set(counts))}: using the largest")
    return moments, max(counts)


def import_flaxchat(step_dir: str | Path, mlp: str, out: str | Path, config: str | dict | None = None,
                    tokenizer: str | None = None, overrides: list[str] = (), force: bool = False,
                    weights_only: bool = False, log=print) -> ImportReport:
    """Read a flaxchat step directory and write it as a jaxchat run in `out`. Returns the report."""
    if mlp not in MLP_CHOICES:
        raise InteropError(f"--mlp {mlp!r}: flaxchat checkpoints use one of {', '.join(MLP_CHOICES)}")
    step_dir = find_step_dir(step_dir)
    report = ImportReport(source=f"flaxchat {step_dir}")
    flat, opt_tree, meta = read_checkpoint(step_dir, optimizer=not weights_only)
    given = parse_config(config)
    if not given:
        given = parse_config({k: v for k, v in meta.items() if isinstance(v, dict)})
        if any(k in given for k in GPT_CONFIG_KEYS):
            report.notes.append("model config taken from the checkpoint metadata")
    said = str(given.get("mlp", mlp)).replace("-", "_")
    if said != mlp:
        raise InteropError(f"--mlp {mlp} but the config says mlp={given['mlp']!r}: pass the MLP it was trained with")
    kinds = detect_mlp(flat)
    if mlp not in kinds:
        raise InteropError(f"--mlp {mlp} does not match the checkpoint: layer 0's MLP holds "
                           f"{sorted(k.split('.mlp.')[1] for k in flat if k.startswith('blocks.0.mlp.'))}, "
                           f"which is --mlp {' or '.join(kinds)}")
    if len(kinds) > 1:
        report.notes.append(f"relu2 and gelu hold identical tensors: trusting --mlp {mlp}")
    cfg = infer_config(flat, given, mlp, report)
    tok = load_user_tokenizer(tokenizer, cfg.vocab_size, report)
    used = set()

    def lookup(path):
        name = path_str(path)
        if name in flat:
            used.add(name)
            return flat[name]
        return None

    model = model_from_lookup(cfg, lookup, f"flaxchat checkpoint {step_dir}",
                              lambda: sorted(set(flat) - used))
    report.mapped = [(n, n, flat[n].shape) for n in sorted(used, key=_natural)]
    count = None
    moments = None if opt_tree is None else _adam_moments(opt_tree, report)
    if moments is not None:
        count = moments[1]
    elif weights_only:
        report.ignored.append("optimizer/ (--weights-only)")
    elif opt_tree is None:
        report.notes.append("no optimizer/ item: optimizer state starts fresh")
    if meta:
        report.ignored.append(f"metadata {json.dumps(meta, sort_keys=True)[:120]}")
    step = int(step_dir.name) if step_dir.name.isdigit() else (count or 0)
    if count is not None and count != step:
        report.notes.append(f"Adam count {count} differs from the step directory {step}: the moments keep "
                            f"count {count} (bias correction), the run and its LR schedule continue at step {step}")
    write_run(out, cfg, param_dict(model), moments, step, tok, report, overrides, force, log)
    return report


def _natural(name: str):
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")]
