"""Checkpoint interop: flaxchat and nanochat imports into runnable jaxchat runs, safetensors export, --from-hub."""

import argparse
import dataclasses
import fcntl
import functools
import json
import os
import shutil
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import safetensors.numpy as safetensors  # a base dependency: its absence is a failure, not a skip

from conftest import fixture_path
from jaxchat.checkpoint import Checkpointer, CheckpointError
from jaxchat.cli import main as cli_main
from jaxchat.config import Config, DataConfig
from jaxchat.data import Tokenizer
from jaxchat.interop import common
from jaxchat.interop.commands import add_parsers
from jaxchat.interop.common import InteropError, flatten_tree
from jaxchat.interop.flaxchat import read_checkpoint
from jaxchat.interop.nanochat import model_from_state_dict
from jaxchat.run import load_run
from jaxchat.optim import build_optimizer
from jaxchat.model.gpt import param_dict
from jaxchat.rundir import load_run_config, lock_run_dir, mark_run_dir
from jaxchat.sample import Sampler
from jaxchat.train import ModelFns, abstract_state

FLAXCHAT_STEP = "flaxchat_gelu_tiny/ckpt/120"


def run_cmd(*argv):
    """Parse and run `jaxchat <argv>` through commands.add_parsers, as cli.py does."""
    p = argparse.ArgumentParser(prog="jaxchat")
    add_parsers(p.add_subparsers(dest="cmd", required=True))
    args = p.parse_args([str(a) for a in argv])
    return args.fn(args)


@functools.partial(jax.jit, static_argnums=0)
def forward(model_cfg, params, idx):
    """Logits, compiled once per model config and shared by every test that imports the same checkpoint."""
    cfg = Config(model=model_cfg, data=DataConfig(tokenizer_vocab=model_cfg.vocab_size))
    return ModelFns(cfg).logits(params, idx)


def logits_of(run, idx):
    cfg, state = restore_state(run)
    return cfg, state, np.asarray(forward(cfg.model, state["params"], jnp.asarray(idx)))


def restore_state(run):
    cfg = load_run_config(run)
    ckpt = Checkpointer(run, async_save=False)
    state, _ = ckpt.restore(abstract_state(ModelFns(cfg), build_optimizer(cfg, None)))
    ckpt.close()
    return cfg, state


def find_states(tree, cls):
    return [x for x in jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, cls)) if isinstance(x, cls)]


@pytest.fixture(scope="module")
def flaxchat(tmp_path_factory):
    """The flaxchat fixture imported with its config and a 512-token BPE trained here on stdlib sources."""
    step_dir = fixture_path(FLAXCHAT_STEP)
    expected = np.load(fixture_path("flaxchat_gelu_tiny/expected.npz"))
    texts = [Path(m.__file__).read_text() for m in (argparse, dataclasses, json.decoder, shutil, types)]
    base = tmp_path_factory.mktemp("flaxchat")
    tok_path = Tokenizer.train(texts, vocab_size=512).save(base / "tok.json")
    run = base / "run"
    run_cmd("import", "flaxchat", step_dir, "--mlp", "gelu", "--config", str(expected["config"]), "--out", run,
            "--tokenizer", tok_path, "--set", "data.max_train_chars=100000")
    return {"run": run, "step_dir": step_dir, "expected": expected, "tok": tok_path, "base": base}


def test_flaxchat_import_reproduces_logits(flaxchat):
    cfg, _, params, _, step = load_run(flaxchat["run"])
    ref = flaxchat["expected"]["logits"]
    assert np.abs(ref).max() > 1.0 and ref.std() > 0.1  # a real signal, not a trivial constant
    out = np.asarray(forward(cfg.model, params, jnp.asarray(flaxchat["expected"]["idx"])))
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() <= 1e-4
    assert step == 120 and cfg.model.norm_eps == 1e-6 and cfg.model.tie_embeddings and cfg.model.mlp == "gelu"
    report = json.loads((flaxchat["run"] / "import.json").read_text())
    assert len(report["mapped"]) == 34 and report["step"] == 120


def test_flaxchat_run_samples(flaxchat):
    """The Sampler runs the imported run (prefill here; train --resume below decodes with it too)."""
    _, fns, params, _, _ = load_run(flaxchat["run"])
    prompt = [int(t) for t in flaxchat["expected"]["idx"][0, :200]]
    ids = Sampler(fns).generate(params, prompt, 1, temperature=0)
    assert ids == [int(np.argmax(flaxchat["expected"]["logits"][0, -1]))]


def test_flaxchat_optimizer_state_restored(flaxchat):
    _, state = restore_state(flaxchat["run"])
    _, opt_tree, _ = read_checkpoint(flaxchat["step_dir"])
    src = flatten_tree(opt_tree)
    adam = find_states(state["opt_state"], optax.ScaleByAdamState)
    assert len(adam) == 1 and int(adam[0].count) == int(src["0.count"]) == 1
    mu, nu = flatten_tree(adam[0].mu), flatten_tree(adam[0].nu)
    assert set(mu) == {k[len("0.mu."):] for k in src if k.startswith("0.mu.")}
    for name in mu:
        assert np.abs(src[f"0.mu.{name}"]).max() > 0 and np.abs(src[f"0.nu.{name}"]).max() > 0, name
        assert np.array_equal(mu[name], src[f"0.mu.{name}"]) and np.array_equal(nu[name], src[f"0.nu.{name}"])
    sched = find_states(state["opt_state"], optax.ScaleByScheduleState)
    assert [int(s.count) for s in sched] == [120]  # the LR schedule resumes at the checkpoint's step


def test_flaxchat_moments_under_the_muon_recipe(flaxchat, tmp_path):
    """optim.optimizer=muon: AdamW groups get the checkpoint's moments, every schedule counter the step."""
    run_cmd("import", "flaxchat", flaxchat["step_dir"], "--mlp", "gelu", "--out", tmp_path / "r", "--set",
            "optim.optimizer=muon")
    _, state = restore_state(tmp_path / "r")
    adam = find_states(state["opt_state"], optax.ScaleByAdamState)
    assert adam and all(int(a.count) == 1 for a in adam)
    wte = [a.mu["wte"]["embedding"] for a in adam if not isinstance(a.mu["wte"]["embedding"], optax.MaskedNode)]
    assert len(wte) == 1 and np.abs(np.asarray(wte[0])).max() > 0
    counts = [int(x) for p, x in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]
              if x.ndim == 0 and "count" in jax.tree_util.keystr(p)]
    assert sorted(set(counts)) == [1, 120]
    assert "no AdamW slot here: blocks.0" in (tmp_path / "r" / "import.json").read_text()


def test_import_prints_mapping(flaxchat, tmp_path, capsys):
    run_cmd("import", "flaxchat", flaxchat["step_dir"], "--mlp", "gelu", "--out", tmp_path / "r", "--weights-only")
    out = capsys.readouterr().out
    assert "mapped 34 tensors" in out and "blocks.*.attn.c_q.kernel" in out and "ignored:" in out
    assert "inferred sequence_len = 2048" in out and "inferred n_kv_head = 4" in out  # said what it guessed
    assert "no --tokenizer" in out


def test_wrong_mlp_is_refused(flaxchat, tmp_path):
    with pytest.raises(InteropError, match=r"--mlp yatnmn does not match.*relu2 or gelu"):
        run_cmd("import", "flaxchat", flaxchat["step_dir"], "--mlp", "yatnmn", "--out", tmp_path / "r")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("n_layer", [6, 3])
def test_wrong_depth_is_refused(flaxchat, tmp_path, n_layer):
    cfg = {**json.loads(str(flaxchat["expected"]["config"])), "n_layer": n_layer}
    with pytest.raises(InteropError, match=f"n_layer={n_layer} but the checkpoint's shapes say 4") as e:
        run_cmd("import", "flaxchat", flaxchat["step_dir"], "--mlp", "gelu", "--config", json.dumps(cfg),
                "--out", tmp_path / "r")
    assert "Fix:" in str(e.value)
    assert not (tmp_path / "r").exists()


def test_wrong_depth_is_refused_by_the_tensor_check(tmp_path):
    """The name/shape check behind every import (here nanochat, whose config is never compared up front)."""
    d = np.load(fixture_path("nanochat_tiny.npz"))
    cfg = {**json.loads(str(d["config"])), "n_layer": 3}
    with pytest.raises(InteropError, match=r"(?s)n_layer=3.*no place for: .*transformer\.h\.3\.attn\.c_q") as e:
        run_cmd("import", "nanochat", fixture_path("nanochat_tiny.npz"), "--config", json.dumps(cfg),
                "--out", tmp_path / "r")
    assert "Fix:" in str(e.value)
    assert not (tmp_path / "r").exists()


def test_existing_out_is_never_overwritten(flaxchat, tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not a jaxchat run"):
        run_cmd("import", "flaxchat", flaxchat["step_dir"], "--mlp", "gelu", "--out", tmp_path)
    with pytest.raises(CheckpointError, match="refusing"):
        run_cmd("import", "flaxchat", flaxchat["step_dir"], "--mlp", "gelu", "--out", tmp_path, "--force")
    assert (tmp_path / "keep.txt").read_text() == "x"


def test_import_force_never_deletes_a_run_in_use(flaxchat, tmp_path):
    """A run another process holds (as `jaxchat train` does) survives `import --force` onto it."""
    run = tmp_path / "busy"
    run.mkdir()
    mark_run_dir(run, "test")
    (run / "config.json").write_text("{}")
    fd = os.open(run, os.O_RDONLY)  # another open file description: flock conflicts even within one process
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(CheckpointError, match="another process is using"):
            run_cmd("import", "flaxchat", flaxchat["step_dir"], "--mlp", "gelu", "--out", run, "--force")
        assert (run / "config.json").read_text() == "{}"
    finally:
        os.close(fd)
    os.close(lock_run_dir(run))  # released: the lock was the only obstacle


def test_nanochat_npz_import(tmp_path, capsys):
    npz = fixture_path("nanochat_tiny.npz")
    d = np.load(npz)
    run_cmd("import", "nanochat", npz, "--out", tmp_path / "run")
    assert "transformer.h.*.attn.c_q.weight" in capsys.readouterr().out
    _, _, out = logits_of(tmp_path / "run", d["idx"])
    assert np.abs(d["logits"]).max() > 1.0
    assert np.abs(out - d["logits"]).max() <= 1e-4
    with pytest.raises(CheckpointError, match="tokenizer.json is missing"):  # no --tokenizer: a clear stop
        load_run(tmp_path / "run")


def test_nanochat_pt_import(tmp_path):
    torch = pytest.importorskip("torch", reason="torch is an optional extra; the .pt reader needs it")
    d = np.load(fixture_path("nanochat_tiny.npz"))
    sd = {k.removeprefix("param/"): d[k] for k in d.files if k.startswith("param/")}
    wte = "transformer.wte.weight"  # stored in bf16, as nanochat does for embeddings
    sd[wte] = np.asarray(jnp.asarray(sd[wte]).astype(jnp.bfloat16).astype(jnp.float32))
    ckdir = tmp_path / "d4"
    ckdir.mkdir()
    pt = {f"_orig_mod.{k}": torch.from_numpy(np.array(v)).to(torch.bfloat16 if k == wte else torch.float32)
          for k, v in sd.items()}
    torch.save(pt, ckdir / "model_000007.pt")
    (ckdir / "meta_000007.json").write_text(json.dumps({"step": 7, "model_config": json.loads(str(d["config"]))}))
    run_cmd("import", "nanochat", ckdir, "--out", tmp_path / "run")
    _, state, out = logits_of(tmp_path / "run", d["idx"])
    assert int(state["step"]) == 7
    ref_model = model_from_state_dict(sd, str(d["config"]))
    ref = np.asarray(forward(ref_model.config, param_dict(ref_model), jnp.asarray(d["idx"])))
    assert np.abs(out - d["logits"]).max() > 0  # the bf16 rounding is really there ...
    assert np.abs(out - ref).max() <= 1e-5  # ... and the .pt reader reproduces it


def test_safetensors_export_round_trip(flaxchat, tmp_path):
    run_cmd("export", flaxchat["run"], "--format", "safetensors", "--out", tmp_path)
    tensors = safetensors.load_file(str(tmp_path / "model.safetensors"))
    _, state = restore_state(flaxchat["run"])
    params = flatten_tree(state["params"])
    assert set(tensors) == set(params) and "blocks.0.attn.c_q.kernel" in tensors
    for name, arr in params.items():
        assert tensors[name].dtype == arr.dtype and np.array_equal(tensors[name], arr), name
    doc = json.loads((tmp_path / "config.json").read_text())
    assert doc["model"]["n_layer"] == 4 and doc["model"]["tie_embeddings"] and doc["step"] == 120
    assert doc["tensors"]["wte.embedding"]["shape"] == [512, 128] and "dense" in doc["layout"]
    assert (tmp_path / "tokenizer.json").is_file()


def test_from_hub_flaxchat(flaxchat, tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    shutil.copytree(flaxchat["step_dir"], hub / "120")
    (hub / "config.json").write_text(json.dumps({"model": json.loads(str(flaxchat["expected"]["config"]))}))
    calls = []
    monkeypatch.setattr(common, "download_from_hub", lambda repo, rev=None: calls.append(repo) or hub)
    run_cmd("import", "flaxchat", "--from-hub", "someone/gelu-tiny", "--mlp", "gelu", "--out", tmp_path / "run")
    assert calls == ["someone/gelu-tiny"]
    _, _, out = logits_of(tmp_path / "run", flaxchat["expected"]["idx"])  # the repo's config.json: seq len
    assert np.abs(out - flaxchat["expected"]["logits"]).max() <= 1e-4


def test_from_hub_nanochat_uses_snapshot_download(tmp_path, monkeypatch):
    d = np.load(fixture_path("nanochat_tiny.npz"))
    hub = tmp_path / "hub" / "base"
    hub.mkdir(parents=True)
    np.savez(hub / "model_000005.npz", **{k: d[k] for k in d.files if k.startswith("param/")})
    (hub / "meta_000005.json").write_text(json.dumps({"step": 5, "model_config": json.loads(str(d["config"])),
                                                      "val_bpb": 1.0}))
    fake = types.SimpleNamespace(snapshot_download=lambda repo_id, revision=None: str(tmp_path / "hub"))
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake)
    run_cmd("import", "nanochat", "--from-hub", "someone/nanochat-d4", "--out", tmp_path / "run")
    _, state, out = logits_of(tmp_path / "run", d["idx"])
    assert int(state["step"]) == 5
    assert np.abs(out - d["logits"]).max() <= 1e-4
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed: a clear message
    with pytest.raises(InteropError, match="pip install huggingface_hub"):
        common.download_from_hub("someone/nanochat-d4")


def test_train_resume_and_eval_from_imported_run(flaxchat, capsys):
    run = flaxchat["base"] / "resume"
    shutil.copytree(flaxchat["run"], run)
    _, before = restore_state(run)
    assert cli_main(["eval", "--run", str(run), "--tokens", "1024", "--batch-size", "2"]) == 0
    assert "val bpb" in capsys.readouterr().out
    assert cli_main(["train", "--run-dir", str(run), "--resume", "--set", "train.num_steps=121", "--set",
                     "train.batch_size=2", "--set", "train.eval_tokens=1024", "--set", "train.sample_tokens=1"]) == 0
    assert "resumed" in capsys.readouterr().out
    rec = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rec if "loss" in r] == [121] and np.isfinite(rec[0]["loss"])
    _, after = restore_state(run)
    assert int(after["step"]) == 121
    moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before["params"]),
                                                       jax.tree.leaves(after["params"]))]
    assert all(moved)


def test_golf_npz_import(tmp_path, capsys):
    """`jaxchat import golf` writes PR #334's fixture model as a run whose logits are the reference's."""
    npz = fixture_path("golf_pr334_tiny.npz")
    d = np.load(npz)
    run_cmd("import", "golf", npz, "--config", str(d["config"]), "--out", tmp_path / "run")
    report = capsys.readouterr().out
    assert "blocks.*.attn.proj.weight" in report and "-> blocks.*.attn.c_proj.kernel [transposed]" in report
    cfg, _, out = logits_of(tmp_path / "run", d["idx"])
    assert cfg.model.unet and cfg.model.bigram_buckets == 37 and cfg.model.rope_dims == 16
    assert np.abs(d["logits"]).max() > 1.0
    assert np.abs(out - d["logits"]).max() <= 1e-4
    with pytest.raises(InteropError, match="no model config"):
        np.savez(tmp_path / "bare.npz", **{k: d[k] for k in d.files if k.startswith("param/")})
        run_cmd("import", "golf", tmp_path / "bare.npz", "--out", tmp_path / "run2")
