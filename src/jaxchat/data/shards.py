"""
Token shards in the modded-nanogpt / llm.c / parameter-golf `.bin` format (docs/architecture.md §Data), read and written.

Layout of one file (all little-endian):
    header  256 x int32: [0] magic 20240520, [1] version, [2] token count, [3:] zero
    tokens  count x uint16 (version 1, the reference format: GPT-2 style vocabularies up to 65536 ids)
            count x uint32 (version 2, llm.c's convention for larger vocabularies such as Llama 3's)
So a file is exactly 1024 + count * itemsize bytes. Files of version 1 are byte-identical to what
modded-nanogpt's `fineweb.py` and parameter-golf write.

jaxchat writes two kinds of file in this format:
- token shards (`tokens/train_000000.bin`): whole documents, each prefixed with BOS, concatenated;
- packed rows (`rows-t1024/train.bin`): rows of T+1 tokens back to back, so (count // (T+1), T+1) once
  memory-mapped; every row starts with BOS. Any reader of the reference format sees a valid token stream.

Why hand-written: the format is 20 lines, and no maintained library reads it (numpy's memmap does the work).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from jaxchat.config import ConfigError

MAGIC = 20240520
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
DTYPES = {1: np.dtype("<u2"), 2: np.dtype("<u4")}


class DataError(ConfigError):
    """A data problem the user can fix (bad path, wrong format, mismatched dataset). The message says how."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else uint32."""
    return DTYPES[1] if vocab_size <= 2**16 else DTYPES[2]


def version_for_dtype(dtype) -> int:
    dtype = np.dtype(dtype).newbyteorder("<")
    for version, dt in DTYPES.items():
        if dt == dtype:
            return version
    raise ValueError(f"token dtype {dtype} has no shard version: use uint16 or uint32")


def make_header(num_tokens: int, version: int = 1) -> bytes:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = MAGIC, version, num_tokens
    return header.tobytes()


def read_header(path: str | os.PathLike) -> tuple[int, int]:
    """(version, token count) of a shard, after checking magic, version and file size; clear errors otherwise."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"token shard {path} does not exist")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise DataError(f"{path} is truncated or not a token shard: {size} bytes, shorter than the "
                        f"{HEADER_BYTES}-byte header of the modded-nanogpt .bin format")
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4")
    if header[0] != MAGIC:
        raise DataError(f"{path} is not a modded-nanogpt token shard: magic number {int(header[0])}, expected "
                        f"{MAGIC} (the first int32 of the 256-int32 header)")
    version, count = int(header[1]), int(header[2])
    if version not in DTYPES:
        raise DataError(f"{path}: unsupported shard version {version} (1 = uint16 tokens, 2 = uint32 tokens)")
    expected = HEADER_BYTES + count * DTYPES[version].itemsize
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise DataError(f"{path} is {what}: the header says {count:,} tokens ({expected:,} bytes) but the file has "
                        f"{size:,} bytes; re-download or re-create it (an interrupted `jaxchat data prepare` "
                        f"resumes by rewriting it)")
    return version, count


def read_shard(path: str | os.PathLike, mmap: bool = True) -> np.ndarray:
    """The tokens of a shard as a 1-D uint16/uint32 array (a read-only memmap by default)."""
    version, count = read_header(path)
    dtype = DTYPES[version]
    if mmap:
        if count == 0:
            return np.empty(0, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(count,))
    with open(path, "rb") as f:
        f.seek(HEADER_BYTES)
        return np.frombuffer(f.read(), dtype=dtype, count=count)


def read_rows(path: str | os.PathLike, row_len: int) -> np.ndarray:
    """Packed rows (N, row_len) memory-mapped from a shard written by `ShardWriter` (read-only)."""
    tokens = read_shard(path)
    if tokens.size % row_len:
        raise DataError(f"{path} holds {tokens.size:,} tokens, not a whole number of rows of {row_len}: it was "
                        f"packed for another sequence length, or is damaged; delete it to re-pack")
    return tokens.reshape(-1, row_len)


def write_shard(path: str | os.PathLike, tokens, dtype=np.uint16) -> str:
    """Write `tokens` as one shard (atomically) and return the file's sha256. Raises if an id does not fit."""
    with ShardWriter(path, dtype) as w:
        w.write(tokens)
    return w.sha256


class ShardWriter:
    """Streams tokens into a shard: header with a zero count first, tokens appended, count patched at `close`,
    then the temporary file is renamed into place (a killed writer never leaves a complete-looking file)."""

    def __init__(self, path: str | os.PathLike, dtype=np.uint16):
        self.path = Path(path)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.version = version_for_dtype(self.dtype)
        self.count = 0
        self.sha256 = ""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        self._f = open(self._tmp, "wb")
        self._f.write(make_header(0, self.version))

    def write(self, tokens) -> None:
        tokens = np.asarray(tokens).reshape(-1)
        if tokens.size == 0:
            return
        if tokens.dtype != self.dtype:
            top, low = int(tokens.max()), int(tokens.min())
            if top > np.iinfo(self.dtype).max or low < 0:
                bad = low if low < 0 else top
                raise ValueError(f"token id {bad} does not fit {self.dtype.name} in {self.path}")
            tokens = tokens.astype(self.dtype)
        self._f.write(tokens.tobytes())
        self.count += tokens.size

    def close(self) -> None:
        if self._f.closed:
            return
        if self.count >= 2**31:
            raise ValueError(f"{self.path}: {self.count:,} tokens overflow the int32 count of the header; "
                             f"use smaller shards")
        self._f.seek(0)
        self._f.write(make_header(self.count, self.version))
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self.sha256 = file_sha256(self._tmp)
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def iter_shard_documents(paths: Iterable[str | os.PathLike], bos_id: int) -> Iterator[np.ndarray]:
    """Documents of a sequence of token shards: cut before every BOS. A document that runs over a shard
    boundary (modded-nanogpt fills shards to an exact size, splitting the last document) is joined back up.
    Yields 1-D arrays in the shards' dtype, each starting with BOS (except a stream that does not start with
    one, whose first document has none)."""
    carry = None
    for path in paths:
        tokens = read_shard(path)
        starts = np.flatnonzero(tokens == bos_id)
        head_end = int(starts[0]) if starts.size else tokens.size
        if carry is not None or head_end:
            head = np.asarray(tokens[:head_end])
            carry = head if carry is None else np.concatenate([carry, head])
        if not starts.size:
            continue
        if carry is not None and carry.size:
            yield carry
        carry = None
        bounds = np.append(starts, tokens.size)
        for a, b in zip(bounds[:-2], bounds[1:-1]):
            yield np.asarray(tokens[a:b])
        carry = np.array(tokens[bounds[-2]:])  # the last document may continue in the next shard
    if carry is not None and carry.size:
        yield carry
