"""`jaxchat export --format hf`: the directory transformers loads computes jaxchat's logits (fp32, max abs diff
<= 1e-4), for the remote-code `jaxchat` type over every architectural switch and for transformers' own
`nanochat` type; generate works; bad inputs leave --out untouched; --push-to-hub is tested up to the upload
(no network here).

Needs torch and transformers (not in the `test` extra: torch has no light CPU wheel on PyPI for CI), so these
tests skip without them: `pip install torch==2.13.0 transformers` to run them."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchat.config import Config, DataConfig, ModelConfig
from jaxchat.data import Tokenizer
from jaxchat.interop.common import ImportReport, InteropError, write_run
from jaxchat.interop.hf import nanochat_mismatches, unexpressed_fields
from jaxchat.model.gpt import GPT, param_dict
from jaxchat.presets import get_preset
from jaxchat.train import ModelFns
from test_interop import run_cmd

torch = pytest.importorskip("torch", reason="the HF export tests load the export in PyTorch: "
                                            "pip install torch==2.13.0 transformers")
transformers = pytest.importorskip("transformers", reason="the HF export tests load the export with transformers: "
                                                          "pip install transformers")

VOCAB = 300
BASE = dict(vocab_size=VOCAB, sequence_len=64, n_layer=4, n_embd=64, n_head=4, n_kv_head=2, compute_dtype="float32",
            attention="xla", rope_norm="xla")
# name -> ModelConfig overrides: every architectural switch is on in at least one of them
CASES = {
    "nanochat_default": {},  # smear, backout, value embeddings, lambdas, SSSL windows, relu2
    "short_windows_swiglu_tied": dict(window_pattern="SL", mlp="swiglu", tie_embeddings=True, sequence_len=160,
                                      n_kv_head=1),
    "gelu_leaky_mult": dict(mlp="leaky_relu2", mlp_mult=3, logit_softcap=0.0, qk_scale=1.0, attn_scale_mult=1.35),
    "gelu": dict(mlp="gelu", value_embeds=False, backout=False),
    "yatnmn": dict(mlp="yatnmn"),
    "yatnmn_softplus": dict(mlp="yatnmn_softplus", n_layer=3),
    "golf": dict(rope_dims=8, qk_norm_before_rope=True, q_gain=1.5, ln_scale=True, smear_v1=True, smear=False,
                 bigram_buckets=97, bigram_dim=32, unet=True, golf_block=True, residual_lambdas=False,
                 logit_softcap=30.0, n_layer=5, value_embeds=False),
    "golf_bigram_full_width_with_smear": dict(bigram_buckets=64, bigram_dim=64, smear_v1=True, unet=True),
    # marin-150m's architecture (6 layers, K = H, half the head dims rotating as zero frequency slots, theta 1024,
    # Llama's rotation, backout after layer 2L/3 - 1 = 3, no cap, init=marin) at C 64, 2 heads of 32
    "marin": dict(n_layer=6, n_head=2, n_kv_head=2, mlp="relu2", tie_embeddings=False, rope_base=1024.0, rope_dims=16,
                  rope_partial="zero_freqs", rope_rotate_half=True, qk_scale=1.0, attn_scale_mult=1.35,
                  window_pattern="L", smear=False, value_embeds=False, residual_lambdas=True, backout=True,
                  backout_layer=3, logit_softcap=0.0, init="marin"),
    # XSA on the last 3 layers with GQA and value embeddings (v includes them), golf's first-dims partial RoPE in
    # Llama's direction, the backout after layer 0
    "xsa_rotate_half_first_dims": dict(xsa_layers=3, rope_dims=8, rope_rotate_half=True, backout_layer=0),
    # XSA on every layer, zero-frequency partial RoPE normed first, with q_gain and windows
    "xsa_all_zero_freqs_norm_first": dict(xsa_layers=4, rope_dims=8, rope_partial="zero_freqs",
                                          qk_norm_before_rope=True, q_gain=1.5, n_kv_head=4),
}
# the switches marin's speedrun added (config.py); each is on in a case above, and test_marin_switches_matter
# checks that turning it off changes jaxchat's logits, so the comparison can tell whether the export reads it
MARIN_SWITCHES = {"rope_partial": "first_dims", "rope_rotate_half": False, "backout_layer": -1, "xsa_layers": 0}
NANOCHAT = dict(smear=False, backout=False, value_embeds=False, residual_lambdas=False, qk_scale=1.0,
                window_pattern="L", n_kv_head=4)


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    texts = [Path(m.__file__).read_text() for m in (dataclasses, json.decoder)]
    return Tokenizer.train(texts, vocab_size=VOCAB).save(tmp_path_factory.mktemp("tok") / "tokenizer.json")


def make_run(out: Path, tok_path, **overrides) -> tuple[Path, ModelConfig, dict]:
    """A run whose every parameter is random (also those initialised to 0 or 1, so each switch matters)."""
    m = ModelConfig(**{**BASE, **overrides})
    params = param_dict(GPT(m))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    leaves = [np.asarray(x + 0.3 * jax.random.normal(k, x.shape)) for k, x in zip(keys, leaves)]
    params = jax.tree.unflatten(tree, leaves)
    write_run(out, m, params, None, 5, Tokenizer.load(tok_path), ImportReport("test"), log=lambda *a: None)
    return out, m, params


def jax_logits(m: ModelConfig, params, idx) -> np.ndarray:
    fns = ModelFns(Config(model=m, data=DataConfig(tokenizer_vocab=VOCAB)))
    return np.asarray(jax.jit(fns.logits)(params, jnp.asarray(idx)))


def hf_logits(model, idx) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(idx)).logits.float().numpy()


def tokens(n=2, T=48, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, size=(n, T))


FAST_CASES = ("nanochat_default", "golf", "marin")  # the rest (~25 s each on 2 cores) run with -m slow


@pytest.mark.parametrize("case", [c if c in FAST_CASES else pytest.param(c, marks=pytest.mark.slow)
                                  for c in sorted(CASES)])
def test_remote_code_export_reproduces_logits(case, tmp_path, tok_path):
    run, m, params = make_run(tmp_path / "run", tok_path, **CASES[case])
    out = tmp_path / "hf"
    run_cmd("export", run, "--format", "hf", "--hf-type", "jaxchat", "--out", out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "jaxchat" and cfg["architectures"] == ["JaxchatForCausalLM"] and "auto_map" in cfg
    model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(model).__name__ == "JaxchatForCausalLM"
    T = min(m.sequence_len, 150)  # past the short window where there is one
    idx = tokens(T=T)
    ref, got = jax_logits(m, params, idx), hf_logits(model, idx)
    assert got.shape == ref.shape == (2, T, VOCAB) and np.abs(ref).max() > 1.0
    diff = np.abs(got - ref).max()
    print(f"{case}: max |logits| {np.abs(ref).max():.3f}, max abs diff {diff:.3e}")
    assert diff <= 1e-4, diff


def test_marin_case_is_the_marin_preset_at_small_size():
    """The `marin` case is marin-150m's ModelConfig but for the sizes (head dim 32 instead of 128, so rope_dims
    is half of it as in the preset)."""
    preset = get_preset("marin-150m").model
    sizes = {"vocab_size", "sequence_len", "n_embd", "n_head", "n_kv_head", "rope_dims", "compute_dtype",
             "attention", "rope_norm"}
    small = ModelConfig(**{**BASE, **CASES["marin"]})
    differ = {f.name for f in dataclasses.fields(ModelConfig) if getattr(small, f.name) != getattr(preset, f.name)}
    assert differ <= sizes, differ - sizes
    assert preset.rope_dims * 2 == preset.head_dim and small.rope_dims * 2 == small.head_dim
    assert preset.n_kv_head == preset.n_head and small.n_kv_head == small.n_head


@pytest.mark.slow
def test_marin_switches_matter(tok_path, tmp_path):
    """Each marin switch, turned off on the same parameters, changes jaxchat's logits by far more than the 1e-4
    the export must match, so an export that ignored it would fail the comparison above."""
    for case in ("marin", "xsa_rotate_half_first_dims", "xsa_all_zero_freqs_norm_first"):
        _, m, params = make_run(tmp_path / case, tok_path, **CASES[case])
        idx = tokens(T=48)
        ref = jax_logits(m, params, idx)
        for field, off in MARIN_SWITCHES.items():
            same_layer = field == "backout_layer" and m.backout_at == m.n_layer // 2  # marin at 6 layers: 3 = 6 // 2
            if getattr(m, field) != off and not same_layer:
                other = jax_logits(dataclasses.replace(m, **{field: off}), params, idx)
                assert np.abs(other - ref).max() > 1e-2, (case, field)
    covered = {f for f in MARIN_SWITCHES for c in CASES.values() if c.get(f, MARIN_SWITCHES[f]) != MARIN_SWITCHES[f]}
    assert covered == set(MARIN_SWITCHES)


def test_nanochat_type_needs_no_remote_code(tmp_path, tok_path):
    run, m, params = make_run(tmp_path / "run", tok_path, **NANOCHAT)
    out = tmp_path / "hf"
    run_cmd("export", run, "--format", "hf", "--out", out)  # auto picks nanochat
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "nanochat" and "auto_map" not in cfg and not (out / "modeling_jaxchat.py").exists()
    model = transformers.AutoModelForCausalLM.from_pretrained(out)  # no trust_remote_code
    assert type(model).__name__ == "NanoChatForCausalLM"
    idx = tokens(T=m.sequence_len)
    ref, got = jax_logits(m, params, idx), hf_logits(model, idx)
    assert np.abs(ref).max() > 1.0 and np.abs(got - ref).max() <= 1e-4, np.abs(got - ref).max()
    # the same run through the remote-code type agrees too
    run_cmd("export", run, "--format", "hf", "--hf-type", "jaxchat", "--out", tmp_path / "remote")
    remote = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "remote", trust_remote_code=True)
    assert np.abs(hf_logits(remote, idx) - ref).max() <= 1e-4


def test_marin_switches_and_the_nanochat_type():
    """Llama's rotation and XSA change the function, so they keep a run off transformers' nanochat type (named);
    rope_partial without rope_dims and backout_layer without backout change nothing, so they do not."""
    native = {**BASE, **NANOCHAT}
    assert nanochat_mismatches(ModelConfig(**native)) == []
    assert nanochat_mismatches(ModelConfig(**native, rope_partial="zero_freqs", backout_layer=1, init="marin")) == []
    assert nanochat_mismatches(ModelConfig(**native, rope_rotate_half=True)) == [
        "model.rope_rotate_half=True (needs False)"]
    assert nanochat_mismatches(ModelConfig(**native, xsa_layers=2)) == ["model.xsa_layers=2 (needs 0)"]


def test_nanochat_type_refused_for_other_architectures(tmp_path, tok_path):
    run, _, _ = make_run(tmp_path / "run", tok_path)
    out = tmp_path / "hf"
    with pytest.raises(InteropError, match=r"model.smear=True \(needs False\).*model.qk_scale=1.2 \(needs 1.0\)"):
        run_cmd("export", run, "--format", "hf", "--hf-type", "nanochat", "--out", out)
    assert not out.exists() and not list(tmp_path.glob(".hf.export-tmp*"))


@pytest.mark.parametrize("case", ["remote", "nanochat", pytest.param("marin", marks=pytest.mark.slow)])
def test_generate_and_tokenizer(case, tmp_path, tok_path):
    arch = {"remote": {}, "nanochat": NANOCHAT, "marin": CASES["marin"]}[case]
    run, m, params = make_run(tmp_path / "run", tok_path, **arch)
    out = tmp_path / "hf"
    run_cmd("export", run, "--format", "hf", "--out", out)
    remote = case != "nanochat"
    assert json.loads((out / "config.json").read_text())["model_type"] == ("jaxchat" if remote else "nanochat")
    model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=remote)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=remote)  # (reads config)
    ours = Tokenizer.load(tok_path)
    text = "def field(default):"
    assert hf_tok(text)["input_ids"] == ours.encode(text)
    assert hf_tok.bos_token == "<|bos|>" and hf_tok.bos_token_id == ours.bos_id
    prompt = [ours.bos_id] + ours.encode(text)
    with torch.no_grad():
        gen = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert gen.shape == (1, len(prompt) + 8) and gen[0, : len(prompt)].tolist() == prompt
    # greedy decoding: each new token is the argmax of jaxchat's logits over the sequence before it
    ref = jax_logits(m, params, gen.numpy())[0]
    assert gen[0, len(prompt):].tolist() == ref[len(prompt) - 1: -1].argmax(-1).tolist()


def test_unknown_switch_is_refused(tmp_path, tok_path, monkeypatch):
    """A ModelConfig field the PyTorch model does not read, away from its default, blocks the export by name."""
    from jaxchat.interop import hf
    run, m, _ = make_run(tmp_path / "run", tok_path, unet=True)
    assert unexpressed_fields(m) == []
    monkeypatch.setattr(hf, "HF_FIELDS", tuple(f for f in hf.HF_FIELDS if f != "unet"))
    with pytest.raises(InteropError, match=r"model.unet=True is not expressed"):
        run_cmd("export", run, "--format", "hf", "--out", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_every_architecture_field_is_read_by_the_pytorch_model():
    """configuration_jaxchat.ARCH_DEFAULTS (the remote config) and hf.HF_FIELDS name the same fields, with
    jaxchat's defaults: a field added to one and not the other fails here."""
    from jaxchat.interop import hf
    ns = {}
    src = (hf.HF_FILES / "configuration_jaxchat.py").read_text()
    exec(compile(src, "configuration_jaxchat.py", "exec"), ns)
    defaults = ns["ARCH_DEFAULTS"]
    assert set(defaults) == set(hf.HF_FIELDS) and len(defaults) > 25
    d = ModelConfig()
    assert {k: getattr(d, k) for k in defaults} == defaults


def test_bad_inputs_leave_nothing(tmp_path, tok_path):
    with pytest.raises(InteropError, match="is not a directory"):
        run_cmd("export", tmp_path / "missing", "--format", "hf", "--out", tmp_path / "hf")
    run, _, _ = make_run(tmp_path / "run", tok_path)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep")
    from jaxchat.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="not empty"):
        run_cmd("export", run, "--format", "hf", "--out", busy)
    assert [p.name for p in busy.iterdir()] == ["mine.txt"]
    with pytest.raises(SystemExit):
        run_cmd("export", run, "--format", "onnx", "--out", tmp_path / "x")
    with pytest.raises(InteropError, match="--format hf only"):
        run_cmd("export", run, "--format", "safetensors", "--push-to-hub", "a/b", "--out", tmp_path / "x")
    with pytest.raises(InteropError, match="OWNER/NAME"):
        run_cmd("export", run, "--format", "hf", "--push-to-hub", "nobody", "--out", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    # --force replaces the export's files and leaves the user's alone
    run_cmd("export", run, "--format", "hf", "--out", busy, "--force")
    assert (busy / "mine.txt").read_text() == "keep" and (busy / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".*export-tmp*"))


def test_push_to_hub_reaches_the_upload(tmp_path, tok_path, monkeypatch):
    """No network here: with the hub offline, the export completes and the push fails with a clear message at
    huggingface_hub's create_repo call (the real client, not a stand-in)."""
    pytest.importorskip("huggingface_hub", reason="--push-to-hub uses huggingface_hub (the jaxchat[hub] extra)")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    run, _, _ = make_run(tmp_path / "run", tok_path)
    out = tmp_path / "hf"
    with pytest.raises(InteropError, match=r"(?s)could not push .* 'alice/jaxchat-test': OfflineModeIsEnabled.*hf upload alice/jaxchat-test"):
        run_cmd("export", run, "--format", "hf", "--push-to-hub", "alice/jaxchat-test", "--out", out)
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
