"""`jaxchat export RUN --format hf`: a Hugging Face transformers model directory, and `--push-to-hub REPO`.

Two model types (docs/interop.md §Hugging Face):
- `nanochat`: transformers' own NanoChatForCausalLM, where the run's architecture is exactly the one it
  implements (NANOCHAT_NATIVE below: nanochat's original model without smear, value embeddings, backout, lambdas,
  sliding windows, QK scale, golf switches,
  Llama's rotation direction or XSA). Loads without remote code.
- `jaxchat`: our PyTorch port of model/gpt.py (hf_files/modeling_jaxchat.py, configuration_jaxchat.py, copied
  into the export), loaded with `trust_remote_code=True`; it expresses every architectural switch of ModelConfig
  this version knows (HF_FIELDS). A run with any other field away from its default (a switch added after this
  exporter) is refused with the field named, never exported as a different model.

Directory written: config.json (model_type, architectures, auto_map for the remote type, the architecture),
model.safetensors (fp32, PyTorch layout: nn.Linear weights (out, in)), generation_config.json, tokenizer.json,
tokenizer_config.json and special_tokens_map.json (bos/eos = the run's BOS, the other specials listed), the two
.py files for the remote type. Everything is written to a staging directory beside --out and moved in at the end,
so a failure leaves --out as it was.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from jaxchat.checkpoint import CheckpointError
from jaxchat.config import EXECUTION_FIELDS, ModelConfig
from jaxchat.data.tokenizer import Tokenizer
from jaxchat.fileio import write_json_atomic
from jaxchat.interop.common import InteropError
from jaxchat.interop.export import flat_params, read_params

HF_FILES = Path(__file__).parent / "hf_files"  # the remote-code files, copied into exports unchanged
REMOTE_FILES = ("configuration_jaxchat.py", "modeling_jaxchat.py")
HF_TYPES = ("auto", "jaxchat", "nanochat")

# The ModelConfig fields the remote-code model reads (configuration_jaxchat.ARCH_DEFAULTS has the same names).
HF_FIELDS = ("vocab_size", "sequence_len", "n_layer", "n_embd", "n_head", "n_kv_head", "mlp", "window_pattern",
             "tie_embeddings", "norm_eps", "rope_base", "qk_scale", "logit_softcap", "smear", "smear_channels",
             "backout", "value_embeds", "ve_gate_channels", "residual_lambdas", "pad_vocab_to", "yatnmn_eps",
             "rope_dims", "qk_norm_before_rope", "q_gain", "attn_scale_mult", "ln_scale", "smear_v1",
             "bigram_buckets", "bigram_dim", "unet", "golf_block", "mlp_mult", "rope_partial", "rope_rotate_half",
             "backout_layer", "xsa_layers")
# Fields that change neither the parameters' values nor the function once trained: initial values and how the
# step is computed. compute_dtype: the export is fp32 (a bf16 run's logits then differ by bf16 rounding).
NOT_ARCHITECTURE = EXECUTION_FIELDS + ("compute_dtype", "init", "embed_init_std", "bigram_scale")

# transformers' nanochat model type: exactly these values (others are free: sizes, eps, base, cap, tying).
NANOCHAT_NATIVE = {"smear": False, "backout": False, "value_embeds": False, "residual_lambdas": False,
                   "qk_scale": 1.0, "attn_scale_mult": 1.0, "q_gain": 0.0, "rope_dims": 0,
                   "qk_norm_before_rope": False, "ln_scale": False, "smear_v1": False, "bigram_buckets": 0,
                   "unet": False, "golf_block": False, "rope_rotate_half": False, "xsa_layers": 0}
NANOCHAT_ACTS = {"relu2": "relu2", "gelu": "gelu_pytorch_tanh"}  # jaxchat mlp -> transformers hidden_act


def unexpressed_fields(m: ModelConfig) -> list[str]:
    """`model.X=value` for every field away from its default that the remote-code model does not read."""
    default = ModelConfig()
    return [f"model.{f.name}={getattr(m, f.name)!r}" for f in dataclasses.fields(m)
            if f.name not in HF_FIELDS + NOT_ARCHITECTURE and getattr(m, f.name) != getattr(default, f.name)]


def nanochat_mismatches(m: ModelConfig) -> list[str]:
    """Why transformers' nanochat type cannot hold this model (empty: it can)."""
    out = [f"model.{k}={getattr(m, k)!r} (needs {v!r})" for k, v in NANOCHAT_NATIVE.items() if getattr(m, k) != v]
    if m.mlp not in NANOCHAT_ACTS:
        out.append(f"model.mlp={m.mlp!r} (needs one of {', '.join(NANOCHAT_ACTS)})")
    if any(w != m.sequence_len for w in m.window_sizes()):
        out.append(f"model.window_pattern={m.window_pattern!r} (needs all-long layers, e.g. L: transformers' "
                   f"nanochat has no sliding window)")
    return out + unexpressed_fields(m)


def choose_type(m: ModelConfig, hf_type: str) -> str:
    if hf_type not in HF_TYPES:
        raise InteropError(f"--hf-type {hf_type!r}: choose one of {', '.join(HF_TYPES)}")
    blocked = unexpressed_fields(m)
    if blocked:
        raise InteropError(f"cannot export this run to Hugging Face: {', '.join(blocked)} "
                           f"{'is' if len(blocked) == 1 else 'are'} not expressed by jaxchat's PyTorch model "
                           f"(interop/hf_files/modeling_jaxchat.py), so the export would compute a different "
                           f"function. Export with --format safetensors instead, or add the switch to that file.")
    mismatch = nanochat_mismatches(m)
    if hf_type == "nanochat" and mismatch:
        raise InteropError("--hf-type nanochat: transformers' nanochat model cannot hold this run: "
                           + "; ".join(mismatch) + ". Use --hf-type jaxchat (remote code) or auto.")
    if hf_type == "auto":
        return "jaxchat" if mismatch else "nanochat"
    return hf_type


def torch_name(name: str) -> tuple[str, bool]:
    """jaxchat parameter path -> (the remote-code model's state-dict key, whether to transpose)."""
    if name.endswith(".kernel"):
        return "model." + name[: -len(".kernel")] + ".weight", True
    if name.endswith(".embedding"):
        return "model." + name[: -len(".embedding")] + ".weight", False
    return "model." + name, False


def jaxchat_tensors(params: dict) -> dict[str, np.ndarray]:
    out = {}
    for name, arr in params.items():
        key, transpose = torch_name(name)
        arr = np.asarray(arr, np.float32)
        out[key] = (arr.T if transpose else arr).copy(order="C")  # (np.ascontiguousarray would make a scalar 1-d)
    return out


def nanochat_tensors(params: dict, m: ModelConfig) -> dict[str, np.ndarray]:
    V = m.vocab_size
    t = {"model.embed_tokens.weight": params["wte.embedding"][:V]}
    if not m.tie_embeddings:
        t["lm_head.weight"] = params["lm_head.kernel"].T[:V]
    names = {"attn.c_q": "self_attn.q_proj", "attn.c_k": "self_attn.k_proj", "attn.c_v": "self_attn.v_proj",
             "attn.c_proj": "self_attn.o_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for i in range(m.n_layer):
        for ours, theirs in names.items():
            t[f"model.layers.{i}.{theirs}.weight"] = params[f"blocks.{i}.{ours}.kernel"].T
    left = set(params) - {"wte.embedding", "lm_head.kernel"} - {f"blocks.{i}.{o}.kernel" for i in range(m.n_layer)
                                                                for o in names}
    if left:  # a parameter the native type has no place for: the config check above let a switch through
        raise InteropError(f"internal: parameters {sorted(left)} have no place in transformers' nanochat model")
    return {k: np.asarray(v, np.float32).copy(order="C") for k, v in t.items()}


def special_ids(tok: Tokenizer | None) -> dict:
    if tok is None:
        return {}
    bos = tok.bos_id
    return {"bos_token_id": bos, "eos_token_id": bos}  # a base model ends a document by starting the next one


def model_config(m: ModelConfig, kind: str, tok: Tokenizer | None, step: int, run_dir: Path) -> dict:
    ids = special_ids(tok)
    source = {"jaxchat_run": str(run_dir.absolute()), "jaxchat_step": step, "jaxchat_compute_dtype": m.compute_dtype}
    if kind == "nanochat":
        return {"model_type": "nanochat", "architectures": ["NanoChatForCausalLM"], "vocab_size": m.vocab_size,
                "hidden_size": m.n_embd, "intermediate_size": m.mlp_mult * m.n_embd, "num_hidden_layers": m.n_layer,
                "num_attention_heads": m.n_head, "num_key_value_heads": m.n_kv_head,
                "max_position_embeddings": m.sequence_len, "hidden_act": NANOCHAT_ACTS[m.mlp],
                "rms_norm_eps": m.norm_eps, "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_base},
                "final_logit_softcapping": m.logit_softcap or None, "tie_word_embeddings": m.tie_embeddings,
                "attention_bias": False, "pad_token_id": None, "dtype": "float32", **ids, **source}
    return {"model_type": "jaxchat", "architectures": ["JaxchatForCausalLM"],
            "auto_map": {"AutoConfig": "configuration_jaxchat.JaxchatConfig",
                         "AutoModelForCausalLM": "modeling_jaxchat.JaxchatForCausalLM"},
            **{f: getattr(m, f) for f in HF_FIELDS}, "use_cache": False, "dtype": "float32", **ids, **source}


def write_tokenizer(run_dir: Path, stage: Path) -> Tokenizer | None:
    if not (run_dir / "tokenizer.json").is_file():
        return None
    tok = Tokenizer.load(run_dir / "tokenizer.json")
    shutil.copyfile(run_dir / "tokenizer.json", stage / "tokenizer.json")
    bos = tok.id_to_token(tok.bos_id)
    others = [tok.id_to_token(i) for i in tok.special_ids if i != tok.bos_id]
    write_json_atomic(stage / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": bos,
        "additional_special_tokens": others, "add_bos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": 10 ** 9})
    write_json_atomic(stage / "special_tokens_map.json",
                      {"bos_token": bos, "eos_token": bos, "additional_special_tokens": others})
    return tok


def check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file, not a directory: choose a directory for the export")
    if out.exists() and any(out.iterdir()) and not force:
        raise CheckpointError(f"--out {out} exists and is not empty: choose another directory or pass --force "
                              f"(which replaces the export's files in it and leaves other files alone)")


def export_hf(run_dir: str | Path, out: str | Path, step: int | None = None, force: bool = False,
              hf_type: str = "auto", log=print, weights: str = "raw") -> Path:
    run_dir, out = Path(run_dir), Path(out)
    check_out(out, force)
    cfg, params, step = read_params(run_dir, step, weights)  # raw, or the run's EMA / SWA average
    m = cfg.model
    kind = choose_type(m, hf_type)
    params = flat_params(params)
    tensors = nanochat_tensors(params, m) if kind == "nanochat" else jaxchat_tensors(params)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.export-tmp{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        save_file(tensors, str(stage / "model.safetensors"), metadata={"format": "pt"})
        tok = write_tokenizer(run_dir, stage)
        write_json_atomic(stage / "config.json", model_config(m, kind, tok, step, run_dir))
        write_json_atomic(stage / "generation_config.json", {**special_ids(tok), "use_cache": kind == "nanochat"})
        if kind == "jaxchat":
            for name in REMOTE_FILES:
                shutil.copyfile(HF_FILES / name, stage / name)
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted(stage.iterdir()):  # each file replaced atomically; the weights last, once all else is in
            if f.name != "model.safetensors":
                os.replace(f, out / f.name)
        os.replace(stage / "model.safetensors", out / "model.safetensors")
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    n = sum(int(v.size) for v in tensors.values())
    how = ("transformers' own nanochat type: AutoModelForCausalLM.from_pretrained(DIR)" if kind == "nanochat"
           else "model type jaxchat (remote code): AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)")
    log(f"exported {run_dir} step {step} ({n:,} parameters, fp32) to {out} as {how}"
        + ("" if tok else "\nnote: the run has no tokenizer.json, so the export has no tokenizer files"))
    return out


def push_to_hub(out: Path, repo: str, private: bool = False, log=print) -> str:
    """Upload an export directory to the Hub repo `repo` (created if missing); returns the commit URL."""
    try:  # imported here: huggingface_hub is optional (the jaxchat[hub] extra)
        from huggingface_hub import HfApi
    except ImportError:
        raise InteropError("--push-to-hub needs the huggingface_hub package: pip install 'jaxchat[hub]' "
                           f"(the export in {out} is complete; upload it later with `hf upload {repo} {out}`)") from None
    try:
        api = HfApi()
        api.create_repo(repo_id=repo, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(out), repo_id=repo, repo_type="model",
                                 commit_message="jaxchat export")
    except Exception as e:  # network, auth, offline mode, bad repo id: all reported the same way
        raise InteropError(f"could not push {out} to the Hugging Face Hub repo {repo!r}: {type(e).__name__}: {e}\n"
                           f"Fix: log in (`hf auth login` or HF_TOKEN), check the network and the repo name; the "
                           f"export in {out} is complete, so `hf upload {repo} {out}` retries just the upload") from None
    log(f"pushed {out} to https://huggingface.co/{repo}")
    return str(getattr(info, "commit_url", info))


def validate_repo(repo: str) -> None:
    """A repo id `owner/name` checked before anything is exported (huggingface_hub's own rule when installed)."""
    parts = repo.split("/")
    if len(parts) != 2 or not all(parts):
        raise InteropError(f"--push-to-hub {repo!r}: give the repo as OWNER/NAME, e.g. alice/jaxchat-d12")
    try:
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ImportError:
        return
    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        raise InteropError(f"--push-to-hub {repo!r} is not a valid repo id: {e}") from None

