"""Sources, `jaxchat data prepare` (round trip, packing, resume), the multi-host loader, the prefetcher,
manifests of runs, HF datasets streaming (on local files) and the `data` / `tokenizer` commands."""

import argparse
import gzip
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from jaxchat.config import ConfigError, DataConfig
from jaxchat.data import (DataError, Prefetcher, Tokenizer, batch_indices, check_manifest, get_batch, load_for_training,
                          load_prepared, open_source, prepare_source, verify)
from jaxchat.data.commands import add_parsers
from jaxchat.data.corpus import stdlib_documents
from jaxchat.data.shards import read_shard
from jaxchat.data.sources import FileSource

SRC = str(Path(__file__).resolve().parents[1] / "src")
QUIET = dict(progress=False, log=lambda *a: None)


def make_texts(n=240, seed=0):
    """Documents of varied length (a few longer than a row), each with a unique tag so we can find it."""
    rng = np.random.default_rng(seed)
    corpus = [t for _, t in stdlib_documents()[200:260]]
    out = []
    for i in range(n):
        body = corpus[i % len(corpus)]
        start = int(rng.integers(0, max(1, len(body) - 3000)))
        out.append(f"doc {i}: " + body[start:start + int(rng.choice([40, 200, 800, 2500]))])
    return out


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([t for _, t in stdlib_documents()[:40]], 512)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    texts = make_texts()
    with open(d / "a.jsonl", "w") as f:
        for t in texts[:150]:
            f.write(json.dumps({"id": len(t), "content": t}) + "\n")
    with gzip.open(d / "b.jsonl.gz", "wt") as f:
        for t in texts[150:]:
            f.write(json.dumps({"content": t}) + "\n")
    return d, texts


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, files, tok):
    d, texts = files
    out = tmp_path_factory.mktemp("prep") / "ds"
    m = prepare_source(open_source([str(d / "*.jsonl*")], text_field="content"), tok, out, val_docs=20, seq=127,
                       shard_tokens=20_000, **QUIET)
    return out, m


# ----------------------------------------------------------------------------------------------------------
# sources

def test_file_sources_read_in_order_and_skip(tmp_path, files):
    d, texts = files
    src = open_source(str(d), text_field="content")  # a directory: every supported file under it, sorted
    assert isinstance(src, FileSource) and list(src.documents()) == texts
    assert list(src.documents(skip=148)) == texts[148:]
    assert src.estimate_docs() is None  # a compressed file has no cheap count
    assert open_source(str(d / "a.jsonl"), text_field="content").estimate_docs() == 150
    (tmp_path / "x.txt").write_text("one document\nof two lines")
    (tmp_path / "y.txt").write_text("another")
    assert list(open_source(str(tmp_path / "*.txt")).documents(skip=1)) == ["another"]
    with pytest.raises(DataError, match="no text field 'text'.*--text-field"):
        next(open_source(str(d / "a.jsonl")).documents())
    with pytest.raises(DataError, match="hf:allenai/c4"):
        open_source("allenai/c4")
    with pytest.raises(DataError, match="unsupported file type"):
        (tmp_path / "z.csv").write_text("a,b")
        open_source(str(tmp_path / "z.csv"))
    assert open_source("hf:allenai/c4:en").describe()["config"] == "en"


def test_compressed_and_missing_optional_packages(tmp_path, files):
    from jaxchat.data.sources import require
    with pytest.raises(DataError, match=r"pip install 'jaxchat\[datasets\]'"):
        require("no_such_module_for_jaxchat", "datasets", "streaming hf:x")
    zstd = pytest.importorskip("zstandard")
    _, texts = files
    lines = "".join(json.dumps({"text": t}) + "\n" for t in texts[:30]).encode()
    (tmp_path / "c.jsonl.zst").write_bytes(zstd.ZstdCompressor().compress(lines))
    assert list(open_source(str(tmp_path / "c.jsonl.zst")).documents(skip=3)) == texts[3:30]


def test_parquet_source(tmp_path, files):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    _, texts = files
    pq.write_table(pa.table({"text": texts[:50], "n": list(range(50))}), tmp_path / "t.parquet", row_group_size=16)
    src = open_source(str(tmp_path / "t.parquet"))
    assert list(src.documents()) == texts[:50] and src.estimate_docs() == 50
    assert list(src.documents(skip=20)) == texts[20:50]  # the first row group is skipped unread
    with pytest.raises(DataError, match="no column 'body'"):
        next(open_source(str(tmp_path / "t.parquet"), text_field="body").documents())


@pytest.mark.parametrize("statistics", [True, False])
def test_parquet_null_rows_are_no_documents(tmp_path, files, statistics):
    """A null text is no document, also for `skip` (prepare skips the validation documents and, on resume, the
    finished shards): documents(skip=k) is documents()[k:] for every k, with and without the null counts in the
    file's metadata that let whole row groups be skipped unread."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    _, texts = files
    rows = [None if i % 5 == 1 else t for i, t in enumerate(texts[:40])]
    pq.write_table(pa.table({"text": rows}), tmp_path / "n.parquet", row_group_size=8, write_statistics=statistics)
    src = open_source(str(tmp_path / "n.parquet"))
    docs = [t for t in rows if t is not None]
    assert list(src.documents()) == docs and len(docs) == 32
    for k in range(len(docs) + 1):
        assert list(src.documents(skip=k)) == docs[k:], k


# ----------------------------------------------------------------------------------------------------------
# prepare: round trip, packing, manifest

def test_round_trip_text_shards_rows_batches(prepared, files, tok):
    out, m = prepared
    _, texts = files
    assert m["val"]["docs"] == 20 and m["train"]["docs"] == len(texts) - 20 and m["train"]["shards"] > 3
    assert m["params"]["dtype"] == "uint16" and len(m["dataset_id"]) == 64
    # text -> shards: the shards hold exactly the documents, in order, each behind one BOS
    stream = np.concatenate([read_shard(out / "tokens" / s["name"]) for s in m["shards"]])
    bounds = np.append(np.flatnonzero(stream == tok.bos_id), stream.size)
    decoded = [tok.decode(stream[a + 1:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    assert decoded == texts  # val (the first 20) then train
    # shards -> rows: every row starts with BOS; every piece between BOS tokens is a run of some document's
    # tokens (no padding: no token comes from anywhere else)
    ds = load_prepared(out, 127, log=lambda *a: None)
    rows = np.asarray(ds.train_rows)
    assert rows.dtype == np.uint16 and rows.shape[1] == 128 and (rows[:, 0] == tok.bos_id).all()
    info = ds.info["train"]
    assert info["tokens_in"] == info["tokens_in_rows"] + info["tokens_cropped"] + info["tokens_dropped"]
    assert info["tokens_in_rows"] == rows.size and info["tokens_cropped"] > 0
    # rows -> batches -> text: one epoch of batches gives back every row once
    B = 16
    steps = rows.shape[0] // B
    got = []
    for step in range(steps):
        x, y = get_batch(ds.train_rows, step, B, seed=5)
        assert x.dtype == np.int32 and (x[:, 1:] == y[:, :-1]).all()
        got.append(np.concatenate([x[:, :1], y], axis=1))
    got = np.concatenate(got)
    idx = np.concatenate([batch_indices(step, B, rows.shape[0], 5) for step in range(steps)])
    assert len(set(idx.tolist())) == steps * B and (got == rows[idx]).all()  # every row at most once, intact
    train_tokens = {tuple(tok.encode(t)) for t in texts[20:]}
    whole = pieces = 0
    for row in got[:200]:
        cut = np.append(np.flatnonzero(row == tok.bos_id), row.size)
        for a, b in zip(cut[:-1], cut[1:]):
            piece = tok.decode(row[a + 1:b])
            assert any(piece in t for t in texts[20:])
            whole += tuple(row[a + 1:b].tolist()) in train_tokens
            pieces += 1
    assert 0 < whole < pieces  # both whole documents and cut/cropped pieces occur
    assert ds.val_text == "".join(texts[:20])
    assert verify(out, log=lambda *a: None)


def test_interrupted_prepare_resumes_to_identical_output(tmp_path, files, tok):
    d, texts = files
    spec = [str(d / "*.jsonl*")]

    class Killed(FileSource):  # the same source, dying after 130 documents (mid-shard, mid-batch)
        def documents(self, skip=0):
            for i, t in enumerate(super().documents(skip)):
                if skip + i == 130:
                    raise KeyboardInterrupt
                yield t

    kw = dict(val_docs=20, seq=127, shard_tokens=20_000, **QUIET)
    ref = prepare_source(open_source(spec, text_field="content"), tok, tmp_path / "ref", **kw)
    src = open_source(spec, text_field="content")
    killed = Killed(src.spec, src.files, "content")
    with pytest.raises(KeyboardInterrupt):
        prepare_source(killed, tok, tmp_path / "run", **kw)
    state = json.loads((tmp_path / "run" / "progress.json").read_text())
    assert 0 < len(state["shards"]) < len(ref["shards"]) and not (tmp_path / "run" / "manifest.json").exists()
    with pytest.raises(DataError, match="interrupted"):
        load_prepared(tmp_path / "run", 127)
    with pytest.raises(DataError, match="other settings.*shard_tokens"):
        prepare_source(src, tok, tmp_path / "run", **{**kw, "shard_tokens": 999})
    logs = []
    again = prepare_source(src, tok, tmp_path / "run", **{**kw, "log": logs.append})
    assert any("resuming" in line for line in logs)
    assert again == ref
    files_ref = sorted(p.relative_to(tmp_path / "ref") for p in (tmp_path / "ref").rglob("*") if p.is_file())
    files_run = sorted(p.relative_to(tmp_path / "run") for p in (tmp_path / "run").rglob("*") if p.is_file())
    assert files_ref == files_run
    for rel in files_ref:
        assert (tmp_path / "ref" / rel).read_bytes() == (tmp_path / "run" / rel).read_bytes(), rel


def test_stdlib_source_keeps_its_split(tmp_path, tok):
    m = prepare_source(open_source("stdlib"), tok, tmp_path / "std", max_docs=30, **QUIET)
    assert m["params"]["val_source"]["spec"] == "stdlib:val" and m["train"]["docs"] == 30
    assert m["val"]["docs"] == open_source("stdlib:val").estimate_docs()


# ----------------------------------------------------------------------------------------------------------
# loader

def test_same_batch_in_a_new_process(prepared):
    out, _ = prepared
    ds = load_prepared(out, 127, log=lambda *a: None)
    x, y = get_batch(ds.train_rows, 11, 8, seed=3)
    assert len({r.tobytes() for r in x}) == 8
    code = (f"import sys; sys.path.insert(0, {SRC!r}); from jaxchat.data import load_prepared, get_batch; "
            f"ds = load_prepared({str(out)!r}, 127, log=lambda *a: None); "
            f"x, y = get_batch(ds.train_rows, 11, 8, seed=3); sys.stdout.write(x.tobytes().hex() + y.tobytes().hex())")
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert got == x.tobytes().hex() + y.tobytes().hex()


def test_four_hosts_read_disjoint_parts_covering_the_epoch():
    """Each host reads the rows of the global batch its devices hold: with 2 accumulated micro-batches of 8 split
    over 4 hosts, host h holds rows 2h, 2h+1 of each micro-batch, i.e. positions {2h, 2h+1, 8+2h, 8+2h+1} of the
    global batch (what distributed.local_positions gives for the (accum, micro, T) sharding). The parts are
    disjoint, put back together they are the global batch, and over an epoch every row is read exactly once."""
    rows = np.arange(103 * 5, dtype=np.int32).reshape(103, 5)  # row i holds 5i..5i+4
    B, A, P = 16, 2, 4
    m = B // A
    positions = [np.array([a * m + j for a in range(A) for j in range(h * m // P, (h + 1) * m // P)])
                 for h in range(P)]
    assert sorted(np.concatenate(positions).tolist()) == list(range(B))  # disjoint, covering the batch
    seen = []
    for step in range(103 // B + 2):  # a little past one epoch
        full_x, full_y = get_batch(rows, step, B, seed=1)
        parts = [get_batch(rows, step, B, seed=1, positions=pos) for pos in positions]
        assert all(x.shape == (B // P, 4) for x, _ in parts)
        got_x, got_y = np.empty_like(full_x), np.empty_like(full_y)
        for pos, (x, y) in zip(positions, parts):
            got_x[pos], got_y[pos] = x, y
        assert (got_x == full_x).all() and (got_y == full_y).all()
        seen.extend((got_x[:, 0] // 5).tolist())  # the rows the hosts read, in global batch order
    assert sorted(seen[:103]) == list(range(103))  # the first epoch: every row exactly once
    with pytest.raises(ValueError, match="global batch of 16 rows, got 0..16"):
        get_batch(rows, 0, B, seed=1, positions=np.arange(17))


def test_prefetcher():
    calls = []

    def fn(step):
        calls.append(step)
        if step == 7:
            raise RuntimeError("bad step")
        return step * 10

    with Prefetcher(fn, start_step=2, depth=2) as pf:
        assert [pf.get(s) for s in range(2, 6)] == [20, 30, 40, 50]
        assert pf.get(3) == 30  # going back restarts there
        assert pf.get(4) == 40
        with pytest.raises(RuntimeError, match="bad step"):
            pf.get(5), pf.get(6), pf.get(7)
        assert pf.get(9) == 90
    assert "jaxchat-prefetch" not in [t.name for t in threading.enumerate()]


# ----------------------------------------------------------------------------------------------------------
# training entry points: config, load_for_training, manifests of runs

def test_config_and_load_for_training(prepared, tmp_path):
    out, m = prepared
    with pytest.raises(ConfigError, match="jaxchat data prepare data/x.jsonl"):
        DataConfig(source="data/x.jsonl")
    with pytest.raises(ConfigError, match="stdlib corpus only"):
        DataConfig(source=str(out), max_train_chars=10)
    with pytest.raises(DataError, match="does not exist.*jaxchat data prepare"):
        load_for_training(DataConfig(source=str(tmp_path / "nope")), 127, tmp_path / "cache")
    logs = []
    ds = load_for_training(DataConfig(source=str(out)), 63, tmp_path / "cache", log=logs.append)  # packs now
    assert any("packing" in line for line in logs) and ds.train_rows.shape[1] == 64
    assert ds.info["dataset_id"] == m["dataset_id"] and (out / "rows-t63" / "pack.json").is_file()


def test_check_manifest_refuses_another_dataset(prepared, files, tok, tmp_path):
    out, _ = prepared
    d, _ = files
    ds = load_prepared(out, 127, log=lambda *a: None)
    run = tmp_path / "run"
    run.mkdir()
    check_manifest(run, ds)  # no data.json (an imported run): nothing to compare
    (run / "data.json").write_text(json.dumps(ds.info))  # what the loop writes when a run starts
    check_manifest(run, ds)
    other_dir = tmp_path / "other"
    prepare_source(open_source(str(d / "a.jsonl"), text_field="content"), tok, other_dir, val_docs=10, **QUIET)
    other = load_prepared(other_dir, 127, log=lambda *a: None)
    with pytest.raises(DataError, match=f"was trained on {out.resolve()}.*--set data.source="):
        check_manifest(run, other)
    repacked = load_prepared(out, 127, pack_buffer=10, log=lambda *a: None)
    with pytest.raises(DataError, match="packed as"):
        check_manifest(run, repacked)
    (run / "data.json").write_text(json.dumps({"source": "stdlib", "key": "abc"}))  # a stdlib run
    with pytest.raises(DataError, match="stdlib"):
        check_manifest(run, ds)


# ----------------------------------------------------------------------------------------------------------
# Hugging Face datasets streaming, through the same path as a hub name

def test_hf_streaming_source_matches_local_files(tmp_path, files, tok):
    pytest.importorskip("datasets")
    d, texts = files
    hf = open_source("hf:json", text_field="content", data_files=[str(d / "a.jsonl")])
    assert hf.kind == "hf"
    assert list(hf.documents()) == texts[:150] and list(hf.documents(skip=140)) == texts[140:150]
    with open(d / "nulls.jsonl", "w") as fh:  # a null text is no document, also for skip
        fh.writelines(json.dumps({"content": None if i % 3 == 0 else t}) + "\n" for i, t in enumerate(texts[:12]))
    nulls = open_source("hf:json", text_field="content", data_files=[str(d / "nulls.jsonl")])
    docs = [t for i, t in enumerate(texts[:12]) if i % 3]
    assert list(nulls.documents()) == docs and list(nulls.documents(skip=5)) == docs[5:]
    kw = dict(val_docs=10, shard_tokens=20_000, **QUIET)
    a = prepare_source(hf, tok, tmp_path / "hf", **kw)
    b = prepare_source(open_source(str(d / "a.jsonl"), text_field="content"), tok, tmp_path / "local", **kw)
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    with pytest.raises(DataError, match="no field 'text'"):
        next(open_source("hf:json", data_files=[str(d / "a.jsonl")]).documents())


# ----------------------------------------------------------------------------------------------------------
# commands

def run_cli(*argv):
    p = argparse.ArgumentParser(prog="jaxchat")
    add_parsers(p.add_subparsers(dest="cmd", required=True))
    args = p.parse_args([str(a) for a in argv])
    args.fn(args)


def test_commands(tmp_path, files, capsys):
    d, texts = files
    for vocab in (300, 400):
        run_cli("tokenizer", "train", d / "a.jsonl", "--text-field", "content", "--vocab", vocab, "--out",
                tmp_path / f"t{vocab}.json")
    t = Tokenizer.load(tmp_path / "t300.json")
    assert t.vocab_size == 300 and t.bos_id == 291
    capsys.readouterr()
    run_cli("tokenizer", "eval", d / "a.jsonl", "--text-field", "content", "--tokenizer", tmp_path / "t300.json",
            "--tokenizer", tmp_path / "t400.json", "--max-docs", 20)
    out = capsys.readouterr().out
    assert "bytes/token" in out
    nbytes = sum(len(x.encode("utf-8")) for x in texts[:20])  # bytes per token, counted independently
    bpt = [nbytes / sum(len(tok.encode(x)) for x in texts[:20])
           for tok in (t, Tokenizer.load(tmp_path / "t400.json"))]
    assert bpt[1] > bpt[0] > 1  # the larger vocab compresses more
    for name, b in zip(("t300.json", "t400.json"), bpt):
        row = next(line.split() for line in out.splitlines() if line.split()[0].endswith(name))
        assert float(row[-2]) == pytest.approx(b, abs=1e-3)
        assert float(row[-1].rstrip("x")) == pytest.approx(b / bpt[0], abs=1e-3)
    os.replace(tmp_path / "t300.json", tmp_path / "t.json")  # the name the rest of this test uses
    run_cli("data", "prepare", d / "a.jsonl", d / "b.jsonl.gz", "--text-field", "content", "--tokenizer",
            tmp_path / "t.json", "--out", tmp_path / "ds", "--val-docs", 5, "--seq", 63, "--no-progress")
    out = capsys.readouterr().out
    assert "packing cropped" in out and "data.source=" in out
    run_cli("data", "info", tmp_path / "ds")
    run_cli("data", "info", tmp_path / "ds" / "tokens" / "val_000000.bin")
    run_cli("data", "verify", tmp_path / "ds")
    out = capsys.readouterr().out
    assert "version 1 (uint16)" in out and "rows-t63" in out and "verified" in out
    shard = tmp_path / "ds" / "tokens" / "train_000000.bin"
    shard.write_bytes(shard.read_bytes()[:-2] + b"\1\1")
    with pytest.raises(DataError, match="failed verification"):
        run_cli("data", "verify", tmp_path / "ds")
