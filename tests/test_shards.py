"""The modded-nanogpt .bin token shard format (docs/architecture.md §Data): byte-exact writing, strict reading, .bin as a source."""

import struct

import numpy as np
import pytest

from jaxchat.data import DataError, Tokenizer, read_shard, write_shard
from jaxchat.data.corpus import stdlib_documents
from jaxchat.data.prepare import prepare_source
from jaxchat.data.shards import ShardWriter, iter_shard_documents, read_header, read_rows
from jaxchat.data.sources import open_source


def reference_bytes(tokens, version=1) -> bytes:
    """What modded-nanogpt's fineweb.py writes: 256 little-endian int32 (magic, version, count, zeros), then
    the tokens as little-endian uint16 (uint32 for llm.c's version 2)."""
    fmt = "H" if version == 1 else "I"
    return struct.pack("<256i", 20240520, version, len(tokens), *[0] * 253) + struct.pack(f"<{len(tokens)}{fmt}",
                                                                                          *tokens)


def reference_read(path) -> np.ndarray:
    """modded-nanogpt's reader: check the header, then every remaining byte is a uint16 token."""
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(1024), dtype=np.int32)
        assert header[0] == 20240520 and header[1] == 1
        tokens = np.frombuffer(f.read(), dtype=np.uint16)
    assert tokens.size == header[2]
    return tokens


def test_write_is_byte_exact_and_reads_back(tmp_path):
    tokens = [50256, 0, 1, 65535, 1234, 50256, 7]
    path = tmp_path / "a.bin"
    sha = write_shard(path, np.array(tokens, dtype=np.int64))
    assert path.read_bytes() == reference_bytes(tokens)
    assert reference_read(path).tolist() == tokens
    assert read_shard(path).tolist() == tokens and read_shard(path, mmap=False).tolist() == tokens
    assert read_header(path) == (1, len(tokens)) and len(sha) == 64
    # version 2: uint32 tokens for vocabularies beyond 65536 ids
    big = [70000, 3, 2**20]
    write_shard(tmp_path / "b.bin", big, dtype=np.uint32)
    assert (tmp_path / "b.bin").read_bytes() == reference_bytes(big, version=2)
    assert read_shard(tmp_path / "b.bin").tolist() == big
    with pytest.raises(ValueError, match="does not fit uint16"):
        write_shard(tmp_path / "c.bin", [70000])
    assert not list(tmp_path.glob("c.bin*"))  # a failed write leaves nothing behind
    write_shard(tmp_path / "empty.bin", [])
    assert read_shard(tmp_path / "empty.bin").size == 0


def test_bad_files_fail_clearly(tmp_path):
    good = reference_bytes(list(range(100)))
    cases = {
        "magic": (struct.pack("<i", 12345) + good[4:], "magic number 12345, expected 20240520"),
        "truncated": (good[:-2], "truncated: the header says 100 tokens"),
        "header": (good[:500], "shorter than the 1024-byte header"),
        "longer": (good + b"\0\0", "longer than its header says"),
        "version": (good[:4] + struct.pack("<i", 7) + good[8:], "unsupported shard version 7"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / f"{name}.bin"
        path.write_bytes(data)
        with pytest.raises(DataError, match=message):
            read_shard(path)
    with pytest.raises(DataError, match="does not exist"):
        read_shard(tmp_path / "missing.bin")
    path = tmp_path / "rows.bin"
    write_shard(path, np.arange(10))
    assert read_rows(path, 5).shape == (2, 5)
    with pytest.raises(DataError, match="not a whole number of rows of 4"):
        read_rows(path, 4)


def test_writer_is_atomic(tmp_path):
    path = tmp_path / "s.bin"
    with pytest.raises(RuntimeError):
        with ShardWriter(path) as w:
            w.write([1, 2, 3])
            raise RuntimeError("killed")
    assert not list(tmp_path.iterdir())
    with ShardWriter(path) as w:
        w.write(np.array([1, 2], dtype=np.uint16))
        w.write([3])
    assert read_shard(path).tolist() == [1, 2, 3] and w.count == 3


def test_documents_span_shard_boundaries(tmp_path):
    # modded-nanogpt fills every shard to its exact size, cutting the last document in two
    stream = [9, 1, 2, 9, 3, 4, 5, 9, 6, 9, 7]
    write_shard(tmp_path / "a.bin", stream[:6])
    write_shard(tmp_path / "b.bin", stream[6:8])  # [5, 9]: the tail of doc 2, then doc 3 starts
    write_shard(tmp_path / "c.bin", stream[8:])
    docs = [d.tolist() for d in iter_shard_documents(sorted(tmp_path.glob("*.bin")), bos_id=9)]
    assert docs == [[9, 1, 2], [9, 3, 4, 5], [9, 6], [9, 7]]
    write_shard(tmp_path / "d.bin", [1, 2, 9, 3])  # a stream that does not start with BOS
    assert [d.tolist() for d in iter_shard_documents([tmp_path / "d.bin"], 9)] == [[1, 2], [9, 3]]


@pytest.fixture(scope="module")
def tok():
    texts = [t for _, t in stdlib_documents()[:40]]
    return Tokenizer.train(texts, 400)


def test_prepare_from_bin_shards(tmp_path, tok):
    """Existing .bin shards are a source: documents are cut at BOS, re-sharded and packed unchanged."""
    texts = [t[:3000] for _, t in stdlib_documents()[100:160]]
    ids = [[tok.bos_id] + tok.encode(t) for t in texts]
    stream = np.concatenate(ids)
    cut = len(stream) // 2 + 17  # not on a document boundary
    write_shard(tmp_path / "in" / "x_train_000000.bin", stream[:cut])
    write_shard(tmp_path / "in" / "x_train_000001.bin", stream[cut:])
    write_shard(tmp_path / "in" / "x_val_000000.bin", np.concatenate(ids[:5]))
    src = open_source(str(tmp_path / "in" / "x_train_*.bin"))
    assert src.tokenized and src.kind == "shards"
    m = prepare_source(src, tok, tmp_path / "out", val_source=open_source(str(tmp_path / "in" / "x_val_*.bin")),
                       seq=63, shard_tokens=5000, progress=False, log=lambda *a: None)
    assert m["train"]["docs"] == len(texts) and m["val"]["docs"] == 5 and m["train"]["shards"] > 2
    out = np.concatenate([read_shard(tmp_path / "out" / "tokens" / s["name"]) for s in m["shards"]
                          if s["split"] == "train"])
    assert out.tolist() == stream.tolist()
    # a tokenizer too small for the shards' ids is caught
    small = Tokenizer.train([t for _, t in stdlib_documents()[:5]], 270)
    with pytest.raises(DataError, match="made with another tokenizer"):
        prepare_source(src, small, tmp_path / "bad", val_docs=1, progress=False, log=lambda *a: None)


def test_large_vocab_gets_uint32_shards(tmp_path):
    """A tokenizer of more than 65536 ids: shards and rows are written as version 2 (uint32)."""
    from tokenizers import Tokenizer as HF
    from tokenizers import models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(70_000)}
    vocab["<|bos|>"] = 70_000
    hf = HF(models.WordLevel(vocab, unk_token="w0"))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf.add_special_tokens(["<|bos|>"])
    tok = Tokenizer(hf)
    assert tok.vocab_size == 70_001 and tok.bos_id == 70_000
    texts = [" ".join(f"w{(i * 7919 + j * 104729) % 70_000}" for j in range(i % 50 + 1)) for i in range(200)]
    (tmp_path / "t").mkdir()
    for i, t in enumerate(texts):
        (tmp_path / "t" / f"{i:03d}.txt").write_text(t)
    m = prepare_source(open_source(str(tmp_path / "t")), tok, tmp_path / "out", val_docs=10, seq=31,
                       progress=False, log=lambda *a: None)
    assert m["params"]["dtype"] == "uint32"
    shard = tmp_path / "out" / "tokens" / "train_000000.bin"
    assert read_header(shard)[0] == 2
    ids = read_shard(shard)
    assert ids.dtype == np.dtype("<u4") and ids.max() > 65535
    assert ids[:1 + len(texts[10].split())].tolist() == [70_000] + tok.encode(texts[10])
    assert read_header(tmp_path / "out" / "rows-t31" / "train.bin")[0] == 2
