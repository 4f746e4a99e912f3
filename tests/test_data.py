"""Data pipeline: corpus, tokenizer, best-fit packing, (seed, step) batches, prepare_dataset and its cache."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxchat.data import (SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, batch_indices, get_batch, iter_eval_batches,
                          pack_bestfit, prepare_dataset, split_long_docs, split_train_val, stdlib_documents)
from jaxchat.data.corpus import corpus_fingerprint, doc_hash, hash_order, take_chars
from jaxchat.data.loader import epoch_permutation

SRC = str(Path(__file__).resolve().parents[1] / "src")
VOCAB = 512
TRICKY = [
    "Hello, world! It's 2024-05-20; we'll see.",
    "emoji 😀👍🏽 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 and ✨",
    "CJK 漢字かなカナ 한국어 中文文本，标点。",
    "windows\r\nline\rendings\n\n\t tabs  and   spaces   ",
    "digits 0 12 345 6789 3.14159 1e-10 ٣٤٥ ①②",
    "combining é vs e\u0301, RTL שלום عربى, zero width \u200b\u200d, NUL \x00 end",
    "    def f(x):\n        return x ** 2  # comment\n",
]
DIGITS = " ".join(str(i * 7919 % 1_000_003) for i in range(20_000))  # digit-heavy text: tempts 3-digit merges


# ----------------------------------------------------------------------------------------------------------
# fixtures

@pytest.fixture(scope="module")
def docs():
    return stdlib_documents()


@pytest.fixture(scope="module")
def tok(docs):
    train, _ = split_train_val(docs)
    texts = [t for _, t in take_chars(hash_order(train), 300_000)] + TRICKY + [DIGITS]
    return Tokenizer.train(texts, VOCAB)


# ----------------------------------------------------------------------------------------------------------
# corpus

def test_corpus_contents_and_determinism(docs):
    names = [n for n, _ in docs]
    assert len(docs) > 300 and sum(len(t) for _, t in docs) > 1_000_000
    assert names == sorted(names) and len(set(names)) == len(names)
    assert "json/decoder.py" in names and "os.py" in names and "pydoc:if" in names
    assert not any(part in ("test", "tests", "idle_test", "site-packages")
                   for n in names for part in n.split("/")[:-1])
    assert "pydoc_data/topics.py" not in names
    assert stdlib_documents() == docs  # a fresh list with the same content
    text = dict(docs)["json/decoder.py"]
    assert "class JSONDecoder" in text


def test_split_disjoint_and_stable(docs):
    train, val = split_train_val(docs, 0.05)
    tn, vn = {n for n, _ in train}, {n for n, _ in val}
    assert vn and tn and not (tn & vn) and len(tn | vn) == len(docs)
    assert 0.01 < len(val) / len(docs) < 0.12
    # membership depends on the name only: any subset splits the same way
    sub_train, sub_val = split_train_val(docs[::3], 0.05)
    assert {n for n, _ in sub_val} == vn & {n for n, _ in docs[::3]}
    # the rule is pinned: sha1-based, not Python's salted hash()
    assert doc_hash("json/decoder.py") == 13586394493085913114
    assert ("json/decoder.py" in vn) == (13586394493085913114 < 0.05 * 2**64)
    assert split_train_val(docs, 0.0)[1] == []


def test_take_chars_is_an_exact_prefix(docs):
    ordered = hash_order(docs)
    capped = take_chars(ordered, 100_000)
    assert sum(len(t) for _, t in capped) == 100_000
    assert [n for n, _ in capped] == [n for n, _ in ordered[:len(capped)]]
    assert take_chars(ordered, 0) == ordered


# ----------------------------------------------------------------------------------------------------------
# tokenizer

# karpathy/nanochat@92d63d4 nanochat/tokenizer.py, written out: the references the module's constants are checked
# against (the order fixes the ids)
NANOCHAT_SPECIAL_TOKENS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                           "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>"]
NANOCHAT_SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                          r"""|\s*[\r\n]|\s+(?!\S)|\s+""")


def test_specials_at_the_end(tok):
    assert tok.vocab_size == VOCAB and list(SPECIAL_TOKENS) == NANOCHAT_SPECIAL_TOKENS
    for i, s in enumerate(NANOCHAT_SPECIAL_TOKENS):
        assert tok.token_to_id(s) == VOCAB - 9 + i
    assert tok.bos_id == VOCAB - 9
    assert tok.special_ids == list(range(VOCAB - 9, VOCAB))
    tb = tok.token_bytes()
    assert tb.dtype == np.int32 and tb.shape == (VOCAB,)
    assert (tb[VOCAB - 9:] == 0).all() and (tb[:VOCAB - 9] >= 1).all()
    assert tok.decode([tok.bos_id]) == "<|bos|>"


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_and_token_bytes(tok, text):
    ids = tok.encode(text)
    assert len(ids) > 0 and max(ids) < VOCAB - 9
    assert tok.decode(ids) == text
    assert int(tok.token_bytes()[ids].sum()) == len(text.encode("utf-8"))


def test_token_bytes_counts_partial_utf8_exactly(tok):
    # a lone continuation byte is 1 byte, though decoding it alone gives U+FFFD (3 bytes)
    ids = tok.encode("😀")
    assert len(ids) > 1  # rare in the training text: split into byte tokens
    tb = tok.token_bytes()
    assert [len(tok.decode([i]).encode("utf-8")) for i in ids] != [int(tb[i]) for i in ids]
    assert int(tb[ids].sum()) == 4
    # decode_bytes keeps the true bytes of any slice, and drops specials
    raw = "😀".encode("utf-8")
    assert tok.decode_bytes(ids[:1]) == raw[:int(tb[ids[0]])] and tok.decode(ids[:1]) == "\ufffd"
    assert tok.decode_bytes([tok.bos_id] + ids + [tok.bos_id]) == raw
    assert all(tok.decode_bytes(tok.encode(t)) == t.encode("utf-8") for t in TRICKY)


def test_encode_batch_matches_encode(tok):
    assert tok.encode_batch(TRICKY) == [tok.encode(t) for t in TRICKY]


def test_save_load_same_ids_and_fingerprint(tok, tmp_path):
    path = tok.save(tmp_path / "tokenizer.json")
    assert path.is_file() and not list(tmp_path.glob("*.tmp*"))
    tok2 = Tokenizer.load(tmp_path)  # a directory holding tokenizer.json works too
    assert tok2.fingerprint() == tok.fingerprint()
    assert all(tok2.encode(t) == tok.encode(t) for t in TRICKY)
    assert (tok2.token_bytes() == tok.token_bytes()).all()
    other = Tokenizer.train(TRICKY * 50 + [DIGITS], 300)
    assert len(tok.fingerprint()) == 64 and other.fingerprint() != tok.fingerprint()


def test_split_regex_groups_digits(tok):
    pieces = [p for p, _ in tok.hf.pre_tokenizer.pre_tokenize_str("12345 x1234567")]
    assert pieces == ["12", "34", "5", "Ġx", "12", "34", "56", "7"]
    vocab = tok.hf.get_vocab()
    two_digit = [t for t in vocab if t.isdigit() and len(t) == 2]
    assert two_digit, "the digit-heavy training text should yield 2-digit tokens"
    ids = tok.encode(DIGITS[:5000])
    assert all(sum(ch.isdigit() for ch in tok.id_to_token(i)) <= 2 for i in ids)
    assert SPLIT_PATTERN == NANOCHAT_SPLIT_PATTERN


def test_train_fails_clearly_when_text_is_too_small():
    with pytest.raises(ValueError, match="smaller vocab"):
        Tokenizer.train(["abab"], 1000)
    with pytest.raises(ValueError, match="must be >="):
        Tokenizer.train(["abab"], 200)


def test_foreign_tokenizer_json(tmp_path):
    """A GPT-2 style tokenizer.json (byte-level, <|endoftext|>, no <|bos|>) works for everything we use."""
    from tokenizers import Tokenizer as HF, decoders, models, pre_tokenizers, trainers
    hf = HF(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(TRICKY * 20, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    hf.save(str(tmp_path / "tokenizer.json"))
    gpt = Tokenizer.load(tmp_path / "tokenizer.json")
    assert gpt.bos_id == hf.token_to_id("<|endoftext|>")
    assert gpt.token_bytes()[gpt.bos_id] == 0
    for text in TRICKY:
        ids = gpt.encode(text)
        assert gpt.decode(ids) == text
        assert int(gpt.token_bytes()[ids].sum()) == len(text.encode("utf-8"))
    plain = HF(models.BPE())
    plain.save(str(tmp_path / "plain.json"))
    with pytest.raises(ValueError, match="none of <\\|bos\\|>, <s>, <\\|endoftext\\|>"):
        Tokenizer.load(tmp_path / "plain.json").bos_id
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        Tokenizer.load(tmp_path / "missing.json")


# ----------------------------------------------------------------------------------------------------------
# packing (BOS = 0 below)

def test_bestfit_hand_checked():
    docs = [[1, 1], [2, 2, 2, 2], [3], [4, 4, 4, 4, 4, 4], [5, 5, 5]]  # with BOS: lengths 3, 5, 2, 7, 4
    rows, st = pack_bestfit(docs, row_len=8, bos_id=0)
    # row 1: the largest that fits is D (7); 1 slot left, nothing fits: crop the shortest, C, to its BOS
    # row 2: B (5) then A (3) fills it exactly; E (4) is left in a partial row, dropped
    assert rows.tolist() == [[0, 4, 4, 4, 4, 4, 4, 0], [0, 2, 2, 2, 2, 0, 1, 1]]
    assert st == {"docs": 5, "rows": 2, "tokens_in": 21, "tokens_in_rows": 16, "tokens_cropped": 1,
                  "tokens_dropped": 4}
    # ties go to the earlier document, for "largest that fits" and for "shortest to crop"
    assert pack_bestfit([[7, 7], [8, 8]], 6, 0)[0].tolist() == [[0, 7, 7, 0, 8, 8]]
    assert pack_bestfit([[1] * 4, [2] * 4], 4, 0)[0].tolist() == [[0, 1, 1, 1], [0, 2, 2, 2]]
    # a document that already starts with BOS gets no second one; buffer_size=1 packs in stream order
    assert pack_bestfit([[0, 9, 9], [5]], 5, 0)[0].tolist() == [[0, 9, 9, 0, 5]]
    assert pack_bestfit([[1], [2, 2, 2]], 4, 0, buffer_size=1)[0].tolist() == [[0, 1, 0, 2]]


def test_bestfit_invariants():
    rng = np.random.default_rng(0)
    row_len, bos = 64, 0
    docs, next_tok = [], 1
    for _ in range(600):  # every token value is unique, so we can find where each document went
        n = int(rng.choice([0, 1, 5, 30, 63, 64, 100, 200]))
        doc = np.arange(next_tok, next_tok + n, dtype=np.int32)
        next_tok += n
        docs.append(np.concatenate([[bos], doc]) if rng.random() < 0.2 else doc)
    rows, st = pack_bestfit(docs, row_len, bos, buffer_size=50)
    assert rows.dtype == np.int32 and rows.ndim == 2 and rows.shape[1] == row_len and st["rows"] > 100
    assert (rows[:, 0] == bos).all()
    assert st["tokens_in"] == sum(len(d) + (0 if len(d) and d[0] == bos else 1) for d in docs)
    assert st["tokens_in"] == st["tokens_in_rows"] + st["tokens_cropped"] + st["tokens_dropped"]
    assert st["tokens_in_rows"] == rows.size and st["tokens_cropped"] > 0
    flat = rows.reshape(-1)
    body = flat[flat != bos]
    assert len(np.unique(body)) == body.size  # nothing duplicated
    where = {int(v): i for i, v in enumerate(flat)}
    placed = whole = 0
    for d in docs:
        d = d[1:] if len(d) and d[0] == bos else d
        if len(d) == 0 or int(d[0]) not in where:
            continue  # an empty document, or one in the dropped tail (or cropped down to its BOS)
        i = where[int(d[0])]
        assert flat[i - 1] == bos and i % row_len != 0  # preceded by its BOS, in the same row
        k = min(len(d), row_len - i % row_len)  # whole, or cropped at the end of the row
        assert (flat[i:i + k] == d[:k]).all()
        placed += k
        whole += k == len(d)
    assert whole > 200  # about half the documents can fit whole (the rest are empty or longer than a row)
    assert placed == body.size  # every non-BOS token in the rows belongs to a document, in order


def test_split_long_docs_is_lossless():
    doc = np.arange(1, 201, dtype=np.int32)
    pieces = split_long_docs([doc, [7, 7]], row_len=64, bos_id=0)
    assert all(p[0] == 0 and len(p) <= 64 for p in pieces) and len(pieces) == 5
    assert np.concatenate([p[1:] for p in pieces[:-1]]).tolist() == doc.tolist()
    assert pieces[-1].tolist() == [0, 7, 7]
    rows, st = pack_bestfit(pieces, 64, 0)
    assert st["tokens_cropped"] == 0


# ----------------------------------------------------------------------------------------------------------
# loader

def test_batches_are_a_pure_function_of_seed_and_step():
    a = batch_indices(7, 16, 1000, seed=3)
    assert len(set(a.tolist())) == 16  # not a trivial constant batch
    epoch_permutation.cache_clear()
    assert (batch_indices(7, 16, 1000, seed=3) == a).all()
    assert (batch_indices(7, 16, 1000, seed=4) != a).any()
    assert (batch_indices(8, 16, 1000, seed=3) != a).any()
    code = (f"import sys; sys.path.insert(0, {SRC!r}); from jaxchat.data import batch_indices; "
            "print(batch_indices(7, 16, 1000, seed=3).tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"})
    assert json.loads(out.stdout) == a.tolist()


@pytest.mark.parametrize("num_rows,batch_size", [(100, 10), (103, 10), (10, 25)])
def test_epochs_cover_every_row_once(num_rows, batch_size):
    seed = 5
    steps = -(-3 * num_rows // batch_size)  # enough steps for three epochs
    seen = np.concatenate([batch_indices(s, batch_size, num_rows, seed) for s in range(steps)])
    for e in range(3):
        epoch = seen[e * num_rows:(e + 1) * num_rows]
        assert sorted(epoch.tolist()) == list(range(num_rows))
        assert (epoch == np.random.default_rng([seed, e]).permutation(num_rows)).all()
    assert (seen[:num_rows] != seen[num_rows:2 * num_rows]).any()  # each epoch has its own order


def test_epoch_boundary_batch():
    p0 = np.random.default_rng([1, 0]).permutation(10)
    p1 = np.random.default_rng([1, 1]).permutation(10)
    assert (p0 != p1).any()
    assert batch_indices(2, 4, 10, seed=1).tolist() == [p0[8], p0[9], p1[0], p1[1]]


def test_get_batch_shifts_rows():
    rows = np.arange(50 * 9, dtype=np.int32).reshape(50, 9)
    x, y = get_batch(rows, step=3, batch_size=4, seed=0)
    idx = batch_indices(3, 4, 50, 0)
    assert x.shape == y.shape == (4, 8) and x.dtype == y.dtype == np.int32
    assert (x == rows[idx, :-1]).all() and (y == rows[idx, 1:]).all()
    assert (x[:, 1:] == y[:, :-1]).all() and (x != y).all()


def test_eval_batches_sequential_and_capped():
    rows = np.arange(10 * 5, dtype=np.int32).reshape(10, 5)
    batches = list(iter_eval_batches(rows, batch_size=3, max_tokens=0))
    assert len(batches) == 3  # full batches only
    assert np.concatenate([x for x, _ in batches]).tolist() == rows[:9, :-1].tolist()
    assert np.concatenate([y for _, y in batches]).tolist() == rows[:9, 1:].tolist()
    assert len(list(iter_eval_batches(rows, batch_size=3, max_tokens=2 * 3 * 4))) == 2
    with pytest.raises(ValueError, match="cannot form one eval batch"):
        iter_eval_batches(rows, batch_size=11)


# ----------------------------------------------------------------------------------------------------------
# prepare_dataset

def test_prepare_dataset_and_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("data")
    logs = []
    ds = prepare_dataset(64, VOCAB, cache, max_train_chars=200_000, log=logs.append)
    assert any("trained BPE tokenizer" in m for m in logs)
    assert ds.sequence_len == 64 and ds.train_rows.shape[1] == ds.val_rows.shape[1] == 65
    assert ds.train_rows.dtype == ds.val_rows.dtype == np.int32
    assert ds.train_rows.shape[0] > 500 and ds.val_rows.shape[0] > 100
    bos = ds.tokenizer.bos_id
    assert bos == VOCAB - 9 and (ds.train_rows[:, 0] == bos).all() and (ds.val_rows[:, 0] == bos).all()
    info = ds.info
    assert info["train_chars"] == 200_000 and info["vocab_size"] == VOCAB
    assert info["tokenizer_fingerprint"] == ds.tokenizer.fingerprint()
    assert info["corpus_fingerprint"] == corpus_fingerprint(stdlib_documents())
    assert info["train"]["tokens_in_rows"] == ds.train_rows.size
    assert 0.95 * info["val_text_bytes"] < info["val_rows_text_bytes"] <= info["val_text_bytes"]
    assert len(ds.val_text.encode("utf-8")) == info["val_text_bytes"]
    # the text in the rows decodes to pieces of the corpus
    assert ds.tokenizer.decode(ds.val_rows[0, 1:20]).replace("<|bos|>", "") in ds.val_text

    logs.clear()
    again = prepare_dataset(64, VOCAB, cache, max_train_chars=200_000, log=logs.append)
    assert any("loaded cached dataset" in m for m in logs) and len(logs) == 1
    assert isinstance(again.train_rows, np.memmap)
    assert (np.asarray(again.train_rows) == np.asarray(ds.train_rows)).all()
    assert (np.asarray(again.val_rows) == np.asarray(ds.val_rows)).all()
    assert again.val_text == ds.val_text and again.info == ds.info
    assert not list(Path(cache).rglob("*.tmp*"))

    val_rows = np.array(ds.val_rows)
    damaged = next(Path(cache).glob("stdlib-*-t64-*")) / "val.npy"
    damaged.unlink()  # a new file: the live memory maps keep the old one
    damaged.write_bytes(b"junk")
    logs.clear()  # a damaged cache entry is rebuilt, to the same arrays
    rebuilt = prepare_dataset(64, VOCAB, cache, max_train_chars=200_000, log=logs.append)
    assert any("rebuilding" in m for m in logs)
    assert (np.asarray(rebuilt.val_rows) == val_rows).all()

    logs.clear()  # another sequence length reuses the tokenizer
    other = prepare_dataset(32, VOCAB, cache, max_train_chars=100_000, log=logs.append)
    assert any("loaded cached tokenizer" in m for m in logs)
    assert other.tokenizer.fingerprint() == ds.tokenizer.fingerprint() and other.train_rows.shape[1] == 33

    # a given tokenizer.json is used as is (and keys the cache)
    path = ds.tokenizer.save(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    logs.clear()
    given = prepare_dataset(32, 0, cache, max_train_chars=100_000, tokenizer_path=str(path), log=logs.append)
    assert any("using tokenizer" in m for m in logs) and given.info["tokenizer_path"] == str(path)
    assert given.tokenizer.fingerprint() == ds.tokenizer.fingerprint()
    assert (np.asarray(given.train_rows) == np.asarray(other.train_rows)).all()
