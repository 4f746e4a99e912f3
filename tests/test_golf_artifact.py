"""The golf artifact (golf/artifact.py, golf/export.py, golf/submission.py): the round trip (the decoded params
are the dequantised ones), the size rule, zstd and its zlib fallback, corrupt files, and the commands
`jaxchat export --format golf`, `jaxchat eval --artifact` and `jaxchat golf` on PR #334's fixture model imported
as a run on the micro dataset (test_cli.py's: 300,000 characters, vocab 512)."""

import json
import os
import zlib

import jax
import numpy as np
import pytest

from jaxchat.cli import main
from jaxchat.golf import artifact as artifact_mod
from jaxchat.golf.artifact import (ArtifactError, build_artifact, code_files, read_artifact, serialize,
                                   decompress, deserialize)
from jaxchat.golf.export import export_golf
from jaxchat.golf.names import params_from_golf_state
from jaxchat.interop.golf import config_from_golf, map_state_dict
from jaxchat.model.gpt import param_dict
from tests.conftest import fixture_path

MICRO_DATA = ["--set", "data.tokenizer_vocab=512", "--set", "data.max_train_chars=300000", "--set",
              "train.eval_tokens=512", "--set", "train.batch_size=4"]


@pytest.fixture(scope="module")
def fx():
    return np.load(fixture_path("golf_pr334_tiny.npz"))


@pytest.fixture(scope="module")
def model(fx):
    cfg = config_from_golf(json.loads(str(fx["config"])), sequence_len=64)
    state = {k[len("param/"):]: fx[k] for k in fx.files if k.startswith("param/")}
    return cfg, param_dict(map_state_dict(state, cfg)[0])


@pytest.fixture(scope="module")
def run(fx, tmp_path_factory):
    """The fixture model as a run with the micro dataset's tokenizer (vocab 512, as the fixture's)."""
    from jaxchat.config import Config, DataConfig
    from jaxchat.run import load_dataset
    d = tmp_path_factory.mktemp("golf")
    data = DataConfig(tokenizer_vocab=512, max_train_chars=300_000)
    cfg = config_from_golf(json.loads(str(fx["config"])), sequence_len=64)
    load_dataset(Config(model=cfg, data=data), log=lambda *a: None).tokenizer.save(d / "tokenizer.json")
    cfg_json = json.dumps(dict(json.loads(str(fx["config"])), sequence_len=64))
    assert main(["import", "golf", str(fixture_path("golf_pr334_tiny.npz")), "--config", cfg_json, "--out",
                 str(d / "run"), "--tokenizer", str(d / "tokenizer.json")] + MICRO_DATA) == 0
    return d / "run"


@pytest.mark.parametrize("scheme,compressor", [("int5", "zstd"), ("int6", "zlib"), ("int8", "zlib")])
def test_round_trip_decodes_to_the_dequantised_params(model, fx, tmp_path, scheme, compressor):
    """(zstd-22 takes 2 s on this megabyte: the other schemes use zlib, the same round trip)"""
    if compressor == "zstd":
        pytest.importorskip("zstandard", reason="golf's zstd-22 needs zstandard (the test extra installs it)")
    cfg, params = model
    blob, acc, deq = build_artifact(params, cfg, scheme, compressor=compressor)
    (tmp_path / "m.golf").write_bytes(blob)
    art = read_artifact(tmp_path / "m.golf")
    assert art.header["scheme"] == scheme and art.cfg == cfg and art.compressor == compressor
    assert set(art.state) == set(deq)
    for k, v in deq.items():
        assert v.dtype == art.state[k].dtype and np.array_equal(v, art.state[k]), k
    expect = params_from_golf_state(deq, cfg)
    for a, b in zip(jax.tree.leaves(art.params), jax.tree.leaves(expect)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # quantisation changed the MLP weights (not a copy of the floats) ...
    w = params["blocks"][0]["mlp"]["c_fc"]["kernel"]
    assert np.abs(np.asarray(art.params["blocks"][0]["mlp"]["c_fc"]["kernel"]) - np.asarray(w)).max() > 0
    if scheme == "int5":  # ... exactly as the reference's round trip does
        for k in art.state:
            np.testing.assert_array_equal(art.state[k], fx["dequant/" + k])
    # the fixture's six MLP matrices get the scheme, tok_emb int8, the rest (29 small tensors) passthrough
    want = {"int5": {"int5": 6, "int8": 1}, "int6": {"int6": 6, "int8": 1}, "int8": {"int8": 7}}[scheme]
    assert acc.model_bytes == len(blob) and acc.tensors == dict(want, passthrough=29)


def test_accounting_adds_model_and_code_bytes(model):
    cfg, params = model
    _, acc, _ = build_artifact(params, cfg, "int5", compressor="zlib")
    files = code_files()
    import jaxchat
    names = {f.relative_to(os.path.dirname(jaxchat.__file__)).as_posix() for f in files}
    assert {"golf/artifact.py", "golf/quant.py", "model/gpt.py", "evaluate.py"} <= names
    assert acc.code_bytes == sum(os.path.getsize(f) for f in files) > 100_000
    assert acc.total_bytes == acc.model_bytes + acc.code_bytes and acc.cap_bytes == 16_000_000 and acc.fits
    _, small, _ = build_artifact(params, cfg, "int5", compressor="zlib", cap=acc.total_bytes - 1)
    assert not small.fits and "OVER THE CAP" in small.line()


def test_over_the_cap_is_refused_and_writes_nothing(run, tmp_path, capsys):
    out = tmp_path / "export"
    with pytest.raises(ArtifactError, match="over the cap.*Nothing was written.*--allow-over-cap"):
        export_golf(run, out, cap=500_000, compressor="zlib")
    assert not out.exists()
    export_golf(run, out, cap=500_000, allow_over_cap=True, compressor="zlib")
    acc = json.loads((out / "accounting.json").read_text())
    assert acc["fits"] is False and acc["total_bytes"] > 500_000 == acc["cap_bytes"]
    assert acc["model_bytes"] == (out / "model.golf").stat().st_size
    assert "OVER THE CAP" in capsys.readouterr().out


def test_zlib_fallback_says_so(model, tmp_path, monkeypatch):
    pytest.importorskip("zstandard", reason="golf's zstd-22 needs zstandard (the test extra installs it)")
    cfg, params = model
    blob_z, _ = artifact_mod.compress(b"jaxchat" * 100)
    assert blob_z[:4] == b"\x28\xb5\x2f\xfd"  # (a real zstd frame)
    monkeypatch.setattr(artifact_mod, "_zstandard", lambda: None)
    blob, acc, deq = build_artifact(params, cfg, "int5")
    assert acc.compressor == "zlib-9" and blob[:1] == b"\x78" and "zlib level 9" in acc.notes[0]
    assert acc.model_bytes == len(blob)
    (tmp_path / "m.golf").write_bytes(blob)
    art = read_artifact(tmp_path / "m.golf")
    assert art.compressor == "zlib" and all(np.array_equal(art.state[k], deq[k]) for k in deq)
    with pytest.raises(ArtifactError, match="zstd-compressed.*pip install 'jaxchat\\[zstd\\]'"):
        decompress(blob_z)
    with pytest.raises(ArtifactError, match="--compressor zstd needs"):
        build_artifact(params, cfg, "int5", compressor="zstd")


def test_corrupt_artifacts_give_clear_errors(model, tmp_path):
    pytest.importorskip("zstandard", reason="golf's zstd-22 needs zstandard (the test extra installs it)")
    cfg, params = model
    blob, _ = artifact_mod.compress(serialize({"a": np.arange(3000, dtype=np.float32)},
                                              {"format": "jaxchat-golf", "version": 1}), "zstd")
    cases = {"truncated": (blob[: len(blob) // 2], "corrupt: decompressing it failed"),
             "noise": (bytes(range(7, 200)), "neither zstd- nor zlib-compressed"),
             "foreign": (zlib.compress(b"hello world"), "not a jaxchat golf artifact"),
             "short": (zlib.compress(serialize({"a": np.zeros(8, np.float32)}, {"format": "jaxchat-golf",
                                                                               "version": 1})[:-4]),
                       "corrupt .*runs past the end")}
    for name, (data, msg) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ArtifactError, match=msg):
            read_artifact(tmp_path / name)
    with pytest.raises(ArtifactError, match="version 9"):
        deserialize(serialize({}, {"format": "jaxchat-golf", "version": 9}))
    with pytest.raises(ArtifactError, match="is not a file"):
        read_artifact(tmp_path / "missing.golf")


def test_export_command_and_its_refusals(run, tmp_path, capsys):
    out = tmp_path / "exp"
    assert main(["export", str(run), "--format", "golf", "--out", str(out), "--quant", "int6", "--compressor",
                 "zlib"]) == 0
    printed = capsys.readouterr().out
    assert "zlib-9, int6" in printed and "of 16,000,000: fits" in printed
    assert {p.name for p in out.iterdir()} == {"model.golf", "accounting.json", "config.json", "tokenizer.json"}
    before = (out / "model.golf").read_bytes()
    assert main(["export", str(run), "--format", "golf", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "model.golf").read_bytes() == before
    (tmp_path / "file").write_text("keep")
    assert main(["export", str(run), "--format", "golf", "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err and (tmp_path / "file").read_text() == "keep"
    assert main(["export", str(tmp_path / "no-run"), "--format", "golf", "--out", str(tmp_path / "x")]) == 2
    assert "a jaxchat run directory" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["export", str(run), "--format", "golf", "--out", str(tmp_path / "y"), "--weights", "ema"]) == 2
    assert "no EMA weights" in capsys.readouterr().err and not (tmp_path / "y").exists()
    assert main(["eval"]) == 2 and "--run RUN_DIR" in capsys.readouterr().err
    assert main(["eval", "--artifact", str(tmp_path / "nope.golf")]) == 2
    assert "is not a file" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_artifact_and_golf_commands(run, tmp_path, capsys):
    pytest.importorskip("zstandard", reason="golf's zstd-22 needs zstandard (the test extra installs it)")
    out = tmp_path / "exp"
    assert main(["export", str(run), "--format", "golf", "--out", str(out), "--quant", "int5"]) == 0
    assert "zstd-22, int5" in capsys.readouterr().out

    assert main(["eval", "--artifact", str(out / "model.golf"), "--batch-size", "4"]) == 0
    line = capsys.readouterr().out
    nums = [float(x.split()[0]) for x in line.split("val bpb ")[1:]]
    assert len(nums) == 2 and 0 < nums[0] < 20 and 0 < nums[1] < 20
    assert nums[0] != nums[1] and abs(nums[0] - nums[1]) < 0.5  # quantised vs unquantised: close, not equal

    sub_dir = tmp_path / "sub"
    assert main(["golf", str(run), "--out", str(sub_dir), "--quant", "int6", "--batch-size", "4", "--tokens", "1024",
                 "--stride", "32", "--ttt-chunk", "256", "--ttt-epochs", "1", "--ttt-freeze-blocks", "1"]) == 0
    sub = json.loads((sub_dir / "submission.json").read_text())
    assert sub["scheme"] == "int6" and sub["steps"] == 0 and sub["params"] > 300_000 and sub["weights"] == "raw"
    assert sub["ttt"] == "score-first" and sub["ttt_legal"] is True and sub["sliding_stride"] == 32
    # TTT's "before" is the sliding score; training on the 3 earlier chunks of 4 changes the score
    assert 0 < sub["val_bpb_sliding"] < 20 and sub["val_bpb_ttt"] != sub["val_bpb_sliding"]
    assert 0 < sub["val_bpb_chunks"] < 20 and sub["val_bpb_chunks"] != sub["val_bpb_sliding"]
    assert sub["total_bytes"] == sub["model_bytes"] + sub["code_bytes"]
    assert sub["model_bytes"] == (sub_dir / "model.golf").stat().st_size
    assert sub["val_bpb_post_quant"] != sub["val_bpb_pre_quant"]
    assert "train_wall_s" not in sub  # (an imported run has no summary.json: absent, not made up)
    assert (sub_dir / "README.md").is_file() and "val bpb before quantisation" in (sub_dir / "README.md").read_text()
    assert main(["golf", str(run), "--out", str(tmp_path / "plain"), "--stride", "0", "--ttt", "none",
                 "--batch-size", "4"]) == 0
    plain = json.loads((tmp_path / "plain" / "submission.json").read_text())
    assert not any(k.startswith(("val_bpb_sliding", "val_bpb_chunks", "val_bpb_ttt", "ttt", "sliding"))
                   for k in plain)  # absent, not faked
    assert main(["golf", str(run), "--out", str(tmp_path / "bad"), "--stride", "0"]) == 2
    assert "give --stride" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(["golf", str(run), "--out", str(tmp_path / "bad"), "--ttt-chunk", "100"]) == 2
    assert "--ttt-chunk 100 must be a positive multiple of the stride (64)" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
    assert main(["golf", str(tmp_path / "no-run"), "--out", str(tmp_path / "sub2")]) == 2
    assert "not a jaxchat run directory" in capsys.readouterr().err
    assert not (tmp_path / "sub2").exists()
