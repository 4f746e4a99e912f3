"""SentencePiece-style tokenizers (issue #20): a sentencepiece .model (parameter-golf's sp1024 kind) and a
Mistral-style HF tokenizer.json (Metaspace, byte fallback, BOS <s>), both trained/built here; parameter-golf's
byte rule for bpb (SPEC_SPEEDRUN §4) against hand counts; golf's .bin shards as a source; bad inputs.

The byte rule's hand count: for documents that a tokenizer reproduces exactly, golf's rule gives each document
exactly its UTF-8 length (the dummy-prefix space after BOS is no byte of the text; every later word's "▁" is a
space; a byte-fallback piece is a byte). The rule as it was before (a "▁" always a space) counts one byte more
per document."""

import io
import json
import re

import numpy as np
import pytest

spm = pytest.importorskip("sentencepiece", reason="sentencepiece .model tokenizers need the sentencepiece extra")

from tokenizers import Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

from jaxchat.cli import main  # noqa: E402
from jaxchat.data import Tokenizer  # noqa: E402
from jaxchat.data.shards import DataError, read_shard  # noqa: E402
from jaxchat.data.sources import open_source  # noqa: E402
from jaxchat.data.prepare import prepare_source  # noqa: E402
from jaxchat.evaluate import target_bytes  # noqa: E402

# a few KB of text: repeated sentences (so BPE learns words) and some words whose characters are rare
WORDS = ("the cat sat on the mat while a dog ran past the old red barn and the farmer counted his sheep "
         "under a grey sky that promised rain before the evening bell rang in the village").split()
DOCS = [" ".join(WORDS[(7 * i) % len(WORDS):] + WORDS[:(7 * i) % len(WORDS)][: 5 + i % 9]) for i in range(160)]
RARE = ["über café naïve", "日本語 text", "emoji 🙂 end"]  # not in the training text: byte fallback


def train_sp(vocab_size=400) -> bytes:
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(DOCS + ["é ï ü"]), model_writer=out,
                                   vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
                                   character_coverage=1.0, minloglevel=2)  # defaults: unk 0, <s> 1, </s> 2
    return out.getvalue()


@pytest.fixture(scope="module")
def sp_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sp") / "sp400.model"
    path.write_bytes(train_sp())
    return path


def mistral_style_json(path, vocab_size=400, form="normalizer"):
    """A tokenizer.json laid out as Mistral-7B's: <unk> 0, <s> 1, </s> 2, <0x00>..<0xFF> 3..258, then BPE
    pieces with "▁"; normalizer Prepend("▁") + Replace(" ", "▁"), decoder Replace, ByteFallback, Fuse, Strip
    (Mistral-7B-v0.1's and Llama-2's files); or, form="metaspace", the Metaspace pre-tokenizer and decoder
    that newer `tokenizers` versions write instead."""
    trainer_tok = HFTokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer_tok.train_from_iterator(DOCS, trainers.BpeTrainer(vocab_size=vocab_size - 259, show_progress=False))
    learned = json.loads(trainer_tok.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    hf.pre_tokenizer = None
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(content=" ", left=1, right=0)])
    if form == "metaspace":
        hf.normalizer = None
        hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        hf.decoder = decoders.Sequence([decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False),
                                        decoders.ByteFallback(), decoders.Fuse()])
    hf.add_special_tokens(["<unk>", "<s>", "</s>"])
    hf.save(str(path))
    return path


@pytest.fixture(scope="module")
def mistral_file(tmp_path_factory):
    return mistral_style_json(tmp_path_factory.mktemp("mistral") / "tokenizer.json")


def stream_of(tok, docs):
    """BOS d1 BOS d2 ...: how jaxchat's shards (and golf's) hold documents."""
    return np.array([t for d in docs for t in [tok.bos_id, *tok.encode(d)]], dtype=np.int64)


def reference_bytes(prev: int, tgt: int, piece, is_boundary, is_byte) -> int:
    """The rule as SPEC_SPEEDRUN §4 states it, one token at a time (the test's own reading of it)."""
    if is_boundary(tgt):
        return 0
    if is_byte(tgt):
        return 1
    p = piece(tgt)
    lead = p.startswith("▁")
    return len((p[1:] if lead else p).encode("utf-8")) + int(lead and not is_boundary(prev))


# ------------------------------------------------------------------------------------------------------------
# the byte rule against hand counts


@pytest.mark.parametrize("kind", ["model", "json", "json-metaspace"])
def test_byte_rule_counts_each_document_as_its_utf8_length(kind, sp_file, mistral_file, tmp_path):
    tok = Tokenizer.load({"model": sp_file, "json": mistral_file}.get(kind)
                         or mistral_style_json(tmp_path / "tokenizer.json", form="metaspace"))
    assert tok.kind == ("sentencepiece" if kind == "model" else "sentencepiece-json")
    docs = [DOCS[3], DOCS[50], *RARE, DOCS[7]]
    for d in docs:  # precondition of the hand count: the tokenizer reproduces these documents exactly
        assert tok.decode(tok.encode(d)) == d
    assert any(re.fullmatch(r"<0x[0-9A-F]{2}>", tok.id_to_token(i)) for i in tok.encode(RARE[1]))  # byte fallback
    s = stream_of(tok, docs)
    rule = tok.byte_rule()
    got = rule.count(s[:-1], s[1:])
    hand = sum(len(d.encode("utf-8")) for d in docs)  # the first BOS is no target
    assert hand > 300 and int(got.sum()) == hand
    assert int(tok.token_bytes()[s[1:]].sum()) == hand + len(docs)  # context-free: each first word's "▁" too
    # per document: the targets between two BOS
    starts = np.flatnonzero(s == tok.bos_id)
    for d, a, b in zip(docs, starts, [*starts[1:], len(s)]):
        assert int(rule.count(s[a:b - 1], s[a + 1:b]).sum()) == len(d.encode("utf-8"))


@pytest.mark.parametrize("kind", ["model", "json"])
def test_compressor_baseline_bytes_are_the_documents(kind, sp_file, mistral_file):
    """evaluate.target_bytes (what gzip/xz are scored on) of a row BOS d1 BOS d2 BOS d3 is the documents' UTF-8
    text, each decoded alone: nothing dropped at a boundary or at the row's end."""
    tok = Tokenizer.load({"model": sp_file, "json": mistral_file}[kind])
    docs = [DOCS[3], DOCS[50], DOCS[7]]
    for d in docs:  # precondition: the tokenizer reproduces these documents exactly
        assert tok.decode(tok.encode(d)) == d
    expected = b"".join(d.encode("utf-8") for d in docs)
    assert len(expected) > 300
    assert target_bytes(tok, stream_of(tok, docs)[None]) == expected


def test_byte_rule_by_hand_on_single_pieces(sp_file):
    tok = Tokenizer.load(sp_file)
    sp = spm.SentencePieceProcessor(model_file=str(sp_file))
    the, bos = sp.piece_to_id("▁the"), 1
    assert sp.id_to_piece(the) == "▁the" and sp.id_to_piece(bos) == "<s>"
    rule = tok.byte_rule()
    counts = rule.count([bos, the, bos, bos, 0, 2], [the, the, bos, 0, the, the]).tolist()
    # ▁the after <s>: 3; after ▁the: 4; <s>, <unk>: 0; ▁the after <unk> and after </s> (boundaries): 3
    assert counts == [3, 4, 0, 0, 3, 3]
    fb = sp.piece_to_id("<0xE6>")
    assert sp.is_byte(fb) and rule.count([the], [fb]).tolist() == [1]
    # every id against the test's own reading of the rule, after a word and after BOS
    n = sp.get_piece_size()
    boundary = lambda i: sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)  # noqa: E731
    for prev in (the, bos):
        want = [reference_bytes(prev, i, sp.id_to_piece, boundary, sp.is_byte) for i in range(n)]
        assert rule.count(np.full(n, prev), np.arange(n)).tolist() == want
    assert sum(want) > n  # not a trivial table
    assert rule.all_targets and tok.kind == "sentencepiece"


def test_byte_level_tokenizers_keep_their_counts():
    """A byte-level BPE's rule is its token_bytes, whatever precedes a token; bpb keeps nanochat's convention."""
    from jaxchat.data.corpus import stdlib_documents

    tok = Tokenizer.train([t for _, t in stdlib_documents()[:30]], 400)
    rule = tok.byte_rule()
    ids = np.array([tok.bos_id, *tok.encode("def f(x):\n    return x  # é"), tok.bos_id, *tok.encode(" ok")])
    assert not rule.contextual and not rule.all_targets and tok.kind == "byte-level"
    assert rule.count(ids[:-1], ids[1:]).tolist() == tok.token_bytes()[ids[1:]].tolist()
    assert int(rule.count(ids[:-1], ids[1:]).sum()) == len("def f(x):\n    return x  # é".encode()) + 3


# ------------------------------------------------------------------------------------------------------------
# end to end: data prepare, train, eval, sample


def _write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


TINY = ["--preset", "tiny", "--set", "model.n_layer=1", "--set", "model.n_embd=32", "--set", "model.n_head=1",
        "--set", "model.n_kv_head=1", "--set", "model.sequence_len=32", "--set", "model.vocab_size=512",
        "--set", "train.batch_size=4", "--set", "train.num_steps=2", "--set", "train.eval_every=2",
        "--set", "train.eval_tokens=256", "--set", "train.sample_tokens=4", "--set", "train.log_every=1"]


@pytest.mark.slow  # (about a minute on 2 cores, mostly compiling train, eval and sample)
@pytest.mark.parametrize("kind", ["model", "json"])
def test_prepare_train_eval_sample(kind, sp_file, mistral_file, tmp_path, capsys):
    tok_path = sp_file if kind == "model" else mistral_file
    tok = Tokenizer.load(tok_path)
    docs = [d + " " + RARE[i % 3] for i, d in enumerate(DOCS[:60])]
    src = _write_jsonl(tmp_path / "docs.jsonl", docs)
    data = tmp_path / "data"
    assert main(["data", "prepare", str(src), "--tokenizer", str(tok_path), "--out", str(data), "--seq", "32",
                 "--val-docs", "12", "--no-progress"]) == 0
    name = "tokenizer.model" if kind == "model" else "tokenizer.json"
    assert Tokenizer.load(data / name).fingerprint() == tok.fingerprint()
    train_tokens = np.concatenate([read_shard(p) for p in sorted((data / "tokens").glob("train_*.bin"))])
    assert train_tokens.tolist() == stream_of(tok, docs[12:]).tolist()  # BOS 1 before every document

    run = tmp_path / "run"
    assert main(["train", *TINY, "--run-dir", str(run), "--set", f"data.source={data}"]) == 0
    assert Tokenizer.load(run / name).fingerprint() == tok.fingerprint()
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--batch-size", "4", "--tokens", "256"]) == 0
    out = capsys.readouterr().out
    ntok, nbytes = (int(x.replace(",", "")) for x in re.search(r"\(([\d,]+) tokens, ([\d,]+) bytes\)", out).groups())
    # the bytes eval scored, by the test's own per-token reading of the rule over the rows it used
    rows = read_shard(data / "rows-t32" / "val.bin").reshape(-1, 33)[: ntok // 32]
    assert ntok == 32 * len(rows) and len(rows) >= 4
    boundary = lambda i: i in (0, 1, 2)  # <unk>, <s>, </s>  # noqa: E731
    is_byte = lambda i: 3 <= i <= 258  # noqa: E731
    want = sum(reference_bytes(int(p), int(t), tok.id_to_token, boundary, is_byte)
               for r in rows for p, t in zip(r[:-1], r[1:]))
    assert nbytes == want and want > ntok
    assert m_bpb(out) > 0

    assert main(["sample", "--run", str(run), "--prompt", "the cat", "--max-tokens", "6", "--seed", "1"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("the cat") and len(first) > len("the cat\n")
    assert main(["sample", "--run", str(run), "--prompt", "the cat", "--max-tokens", "6", "--seed", "1"]) == 0
    assert capsys.readouterr().out == first


def m_bpb(out: str) -> float:
    return float(re.search(r"val bpb ([\d.]+)", out).group(1))


@pytest.mark.parametrize("kind", ["model", "json", "byte-level"])
def test_eval_step_counts_bytes_with_the_previous_token(kind, sp_file, mistral_file):
    """The jitted eval step (the one train and eval use) applies the rule with each target's input token, on
    a real tiny model: bytes equal the hand count (the documents' UTF-8 length, whichever kind), and the
    numerator is golf's (every target's NLL) for the SentencePiece kind, nanochat's (targets with bytes)
    for byte-level."""
    import jax

    from jaxchat.data.corpus import stdlib_documents
    from jaxchat.evaluate import make_eval_step
    from jaxchat.overrides import apply_overrides
    from jaxchat.presets import get_preset
    from jaxchat.train import ModelFns

    if kind == "byte-level":
        tok = Tokenizer.train([t for _, t in stdlib_documents()[:30]], 400)
    else:
        tok = Tokenizer.load(sp_file if kind == "model" else mistral_file)
    docs = [DOCS[1], RARE[0], DOCS[2], RARE[1], DOCS[9], RARE[2]]
    s = stream_of(tok, docs)
    s = np.concatenate([s, np.full(-(len(s) - 1) % 16, tok.bos_id)])  # BOS padding: 0 bytes, whole rows
    # rows of 17 overlapping by one token: every token of s but the first is a target exactly once, after the
    # token it follows in s, and most rows start inside a document (their first target follows a word)
    rows = np.stack([s[i:i + 17] for i in range(0, len(s) - 1, 16)]).astype(np.int32)
    assert sum(r[0] != tok.bos_id for r in rows) > len(rows) // 2
    cfg = apply_overrides(get_preset("tiny"), ["model.n_layer=1", "model.n_embd=32", "model.n_head=1",
                                               "model.n_kv_head=1", "model.sequence_len=16", "model.vocab_size=512",
                                               "data.tokenizer_vocab=512"])
    fns = ModelFns(cfg)
    params = fns.init_params(0)
    step = make_eval_step(fns, tok.byte_rule())
    out = jax.device_get(step(params, rows[:, :-1], rows[:, 1:]))
    want_bytes = sum(len(d.encode("utf-8")) for d in docs)  # by hand
    assert want_bytes > 100 and int(out["bytes"]) == want_bytes
    assert int(out["tokens"]) == rows[:, 1:].size and float(out["nll"]) > 0
    if kind == "byte-level":  # nanochat's numerator: the BOS targets' NLL is left out
        assert float(out["nll_bytes"]) < float(out["nll"])
    else:  # golf's: every target's
        assert float(out["nll_bytes"]) == float(out["nll"])


def test_decode_after_keeps_the_space_a_continuation_starts_with(sp_file, mistral_file):
    for path in (sp_file, mistral_file):
        tok = Tokenizer.load(path)
        prompt, rest = tok.encode("the cat"), tok.encode("the cat sat on")[len(tok.encode("the cat")):]
        assert tok.decode(rest) == "sat on"  # alone, the first word loses its space
        assert tok.decode_after(prompt, rest) == " sat on"


# ------------------------------------------------------------------------------------------------------------
# golf's .bin shards as a source


def golf_shard(path, tokens):
    """A shard as parameter-golf writes it: 256 int32 header (20240520, 1, count), then uint16 tokens."""
    header = np.zeros(256, dtype="<i4")
    header[:3] = [20240520, 1, len(tokens)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header.tobytes() + np.asarray(tokens, dtype="<u2").tobytes())
    return path


def test_golf_shards_load_as_a_source(sp_file, tmp_path):
    tok = Tokenizer.load(sp_file)
    assert tok.bos_id == 1
    docs = [DOCS[i] + (" " + RARE[i % 3] if i % 4 == 0 else "") for i in range(40)]
    stream = stream_of(tok, docs)
    golf_shard(tmp_path / "golf" / "fineweb_train_000000.bin", stream[:501])  # cut inside a document
    golf_shard(tmp_path / "golf" / "fineweb_train_000001.bin", stream[501:])
    golf_shard(tmp_path / "golf" / "fineweb_val_000000.bin", stream_of(tok, docs[:6]))
    src = open_source(str(tmp_path / "golf" / "fineweb_train_*.bin"))
    assert src.kind == "shards"
    docs_back = list(src.token_documents(0, tok.bos_id))
    assert len(docs_back) == 40 and [tok.decode(d) for d in docs_back] == docs
    m = prepare_source(src, tok, tmp_path / "out", val_source=open_source(str(tmp_path / "golf" / "fineweb_val_*.bin")),
                       seq=31, progress=False, log=lambda *a: None)
    assert m["train"]["docs"] == 40 and m["val"]["docs"] == 6
    out = np.concatenate([read_shard(tmp_path / "out" / "tokens" / s["name"]) for s in m["shards"]
                          if s["split"] == "train"])
    assert out.tolist() == stream.tolist()


def test_golf_shard_with_a_bad_header_is_refused(tmp_path):
    path = golf_shard(tmp_path / "fineweb_train_000000.bin", [1, 5, 6, 7])
    raw = bytearray(path.read_bytes())
    raw[0:4] = np.array([20240519], "<i4").tobytes()
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"not a modded-nanogpt token shard: magic number 20240519, expected 20240520"):
        open_source(str(path))
    golf_shard(path, [1, 5, 6, 7])
    path.write_bytes(path.read_bytes()[:-2])  # the header says 4 tokens, the file holds 3
    with pytest.raises(DataError, match="is truncated: the header says 4 tokens"):
        open_source(str(path))


# ------------------------------------------------------------------------------------------------------------
# bad inputs


def test_a_model_file_that_is_not_one(tmp_path, capsys):
    bad = tmp_path / "sp.model"
    bad.write_bytes(b"\x0a\x05hello this is not a sentencepiece model" * 3)
    with pytest.raises(ValueError, match=r"sp\.model is not a sentencepiece model .*pass a \.model file"):
        Tokenizer.load(bad)
    (tmp_path / "tokenizer.json").write_bytes(b"\x0a\x05 a damaged file")  # a .json stays a tokenizer.json
    with pytest.raises(ValueError, match="is not a readable HF tokenizer.json"):
        Tokenizer.load(tmp_path / "tokenizer.json")
    src = _write_jsonl(tmp_path / "docs.jsonl", DOCS[:4])
    assert main(["data", "prepare", str(src), "--tokenizer", str(bad), "--out", str(tmp_path / "d")]) != 0
    assert "is not a sentencepiece model" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
    assert main(["train", *TINY, "--run-dir", str(tmp_path / "run"), "--set", f"data.tokenizer_path={bad}"]) == 2
    err = capsys.readouterr().err
    assert "data.tokenizer_path=" in err and "is not a sentencepiece model" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # (about 15 s: Orbax write and read of the imported run)
def test_golf_import_and_export_carry_a_sentencepiece_model(sp_file, tmp_path, capsys):
    """`jaxchat import golf --tokenizer sp.model` (PR #334's fixture model with a golf-kind tokenizer): the run
    holds tokenizer.model, loads it back, and `jaxchat export` ships it next to the weights."""
    from conftest import fixture_path

    from jaxchat.run import load_run

    d = np.load(fixture_path("golf_pr334_tiny.npz"))
    run = tmp_path / "run"
    assert main(["import", "golf", str(fixture_path("golf_pr334_tiny.npz")), "--config", str(d["config"]),
                 "--tokenizer", str(sp_file), "--out", str(run)]) == 0
    assert (run / "tokenizer.model").read_bytes() == sp_file.read_bytes() and not (run / "tokenizer.json").exists()
    cfg, _, _, tok, _ = load_run(run)
    assert tok.fingerprint() == Tokenizer.load(sp_file).fingerprint() and tok.bos_id == 1
    assert cfg.data.tokenizer_path == str(run / "tokenizer.model")
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == sp_file.read_bytes()
