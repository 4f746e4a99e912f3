"""
prepare_dataset: corpus -> tokenizer -> token documents -> packed rows, cached on disk.

Steps (each logged with its time):
1. corpus: the stdlib documents, split train/val by file (sha1 of the name);
2. tokenizer: trained on ALL train documents (cheap: ~4 s for the ~11 MB default corpus at vocab 8192), or
   loaded from `tokenizer_path`; cached by itself, so runs that differ only in sequence_len or
   max_train_chars share it;
3. train text: the train documents in a fixed pseudo-random order (by name hash, so a prefix is a fair sample
   of the corpus) capped at `max_train_chars` characters (0 = all); val is never capped;
4. tokenize both splits with HF's parallel batch encoding;
5. cut documents longer than a row into row-sized BOS-prefixed pieces (best-fit would otherwise crop away most
   of every long source file), then BOS best-fit pack into rows of sequence_len + 1 tokens.

Everything lands in `cache_dir/<key>/` (tokenizer.json, train.npy, val.npy, val.txt, info.json), keyed by a
hash of (format version, Python version, corpus fingerprint, tokenizer, vocab, sequence_len, max_train_chars,
val_fraction). Files are written atomically, info.json last; a second call just memory-maps the arrays.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .corpus import corpus_fingerprint, corpus_stats, hash_order, split_train_val, stdlib_documents, take_chars
from .packing import PACK_BUFFER, pack_bestfit, split_long_docs
from .tokenizer import Tokenizer

FORMAT_VERSION = 1  # bump when anything below changes what lands in the cache


@dataclass
class Dataset:
    """A tokenized, packed corpus. Rows are (N, sequence_len + 1) int32, each starting with BOS."""
    tokenizer: Tokenizer
    train_rows: np.ndarray
    val_rows: np.ndarray
    val_text: str  # the raw validation documents, concatenated (for gzip/xz bits-per-byte baselines)
    info: dict

    @property
    def sequence_len(self) -> int:
        return int(self.train_rows.shape[1]) - 1


def _atomic_write(path: Path, write: Callable) -> None:
    """Write through `write(file)` to a temporary file next to `path`, then rename it into place."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def _key(**fields) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _get_tokenizer(train_docs, vocab_size, cache_dir, corpus_fp, log) -> Tokenizer:
    key = _key(v=FORMAT_VERSION, python=sys.version, corpus=corpus_fp, vocab=vocab_size)
    path = cache_dir / f"tokenizer-v{vocab_size}-{key[:16]}" / "tokenizer.json"
    if path.is_file():
        tok = Tokenizer.load(path)
        log(f"data: loaded cached tokenizer {path}")
        return tok
    t0 = time.time()
    tok = Tokenizer.train((text for _, text in train_docs), vocab_size)
    tok.save(path)
    chars = sum(len(t) for _, t in train_docs)
    log(f"data: trained BPE tokenizer, vocab {vocab_size}, on {chars / 1e6:.1f}M chars ({time.time() - t0:.1f}s)")
    return tok


def _tokenize_and_pack(tok: Tokenizer, docs, row_len: int, what: str, log) -> tuple[np.ndarray, dict]:
    t0 = time.time()
    ids = [np.asarray(x, dtype=np.int32) for x in tok.encode_batch([text for _, text in docs])]
    t1 = time.time()
    rows, stats = pack_bestfit(split_long_docs(ids, row_len, tok.bos_id), row_len, tok.bos_id, PACK_BUFFER)
    stats = {**stats, "docs": len(docs), "pieces": stats["docs"], "tokens": int(sum(x.size for x in ids)),
             "tokenize_s": round(t1 - t0, 3), "pack_s": round(time.time() - t1, 3)}
    if rows.shape[0] == 0:
        raise ValueError(f"the {what} split packs into 0 rows of {row_len} tokens ({stats['tokens']} tokens): "
                         f"use a shorter sequence_len or more data (max_train_chars=0 takes everything)")
    lost = (stats["tokens_cropped"] + stats["tokens_dropped"]) / max(stats["tokens_in"], 1)
    log(f"data: {what}: {len(docs)} docs, {stats['tokens']:,} tokens -> {rows.shape[0]:,} rows x {row_len} "
        f"({lost:.1%} cropped/dropped; tokenize {t1 - t0:.1f}s, pack {time.time() - t1:.1f}s)")
    return rows, stats


def prepare_dataset(sequence_len: int, vocab_size: int, cache_dir: str | Path, max_train_chars: int = 0,
                    tokenizer_path: str = "", val_fraction: float = 0.05, log=print) -> Dataset:
    """Build (or load from `cache_dir`) the packed stdlib dataset for rows of sequence_len + 1 tokens.

    vocab_size is the size of the tokenizer to train (ignored when `tokenizer_path` is given); max_train_chars
    caps the train text (0 = all of it); the val split is always whole."""
    if sequence_len < 1:
        raise ValueError(f"sequence_len={sequence_len} must be >= 1")
    if max_train_chars < 0:
        raise ValueError(f"max_train_chars={max_train_chars} must be >= 0 (0 = the whole corpus)")
    t_start = time.time()
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    row_len = sequence_len + 1

    docs = stdlib_documents()
    corpus_fp = corpus_fingerprint(docs)
    user_tok = Tokenizer.load(tokenizer_path) if tokenizer_path else None
    key = _key(v=FORMAT_VERSION, python=sys.version, corpus=corpus_fp,
               tokenizer=user_tok.fingerprint() if user_tok else "",
               vocab=0 if tokenizer_path else vocab_size, seq=sequence_len, max_train_chars=max_train_chars,
               val_fraction=val_fraction, pack_buffer=PACK_BUFFER)
    out = cache_dir / f"stdlib-v{vocab_size if not tokenizer_path else 'custom'}-t{sequence_len}-{key[:16]}"
    info_path = out / "info.json"
    if info_path.is_file():
        try:
            info = json.loads(info_path.read_text())
            if info.get("key") == key:
                ds = Dataset(tokenizer=Tokenizer.load(out),  # (tokenizer.json or tokenizer.model)
                             train_rows=np.load(out / "train.npy", mmap_mode="r"),
                             val_rows=np.load(out / "val.npy", mmap_mode="r"),
                             val_text=(out / "val.txt").read_bytes().decode("utf-8"), info=info)
                log(f"data: loaded cached dataset {out} ({ds.train_rows.shape[0]:,} train rows, "
                    f"{ds.val_rows.shape[0]:,} val rows; {time.time() - t_start:.1f}s)")
                return ds
        except (OSError, ValueError) as e:  # a damaged cache entry is rebuilt, never trusted
            log(f"data: cache entry {out} is unreadable ({e}); rebuilding it")

    # 1. corpus and split
    train_docs, val_docs = split_train_val(docs, val_fraction)
    if not val_docs:
        raise ValueError(f"val_fraction={val_fraction} leaves no validation documents: raise it")
    train_docs = hash_order(train_docs)
    stats = corpus_stats(docs)
    log(f"data: stdlib corpus (Python {sys.version.split()[0]}): {stats['docs']} docs, "
        f"{stats['chars'] / 1e6:.1f}M chars; train {len(train_docs)} / val {len(val_docs)} docs")

    # 2. tokenizer (on all train docs, before the cap, so every cap shares one tokenizer)
    t0 = time.time()
    if user_tok is not None:
        tok = user_tok
        log(f"data: using tokenizer {tokenizer_path} (vocab {tok.vocab_size}, bos id {tok.bos_id})")
    else:
        tok = _get_tokenizer(train_docs, vocab_size, cache_dir, corpus_fp, log)
    t_tok = time.time() - t0

    # 3-5. cap, tokenize, split long docs, pack
    train_docs = take_chars(train_docs, max_train_chars)
    train_rows, train_stats = _tokenize_and_pack(tok, train_docs, row_len, "train", log)
    val_rows, val_stats = _tokenize_and_pack(tok, val_docs, row_len, "val", log)
    val_text = "".join(text for _, text in val_docs)

    info = {
        "key": key,
        "format_version": FORMAT_VERSION,
        "python": sys.version,
        "source": "stdlib",
        "corpus": stats,
        "corpus_fingerprint": corpus_fp,
        "tokenizer_fingerprint": tok.fingerprint(),
        "tokenizer_path": str(tokenizer_path),
        "vocab_size": tok.vocab_size,
        "bos_id": tok.bos_id,
        "sequence_len": sequence_len,
        "max_train_chars": max_train_chars,
        "val_fraction": val_fraction,
        "train_chars": sum(len(t) for _, t in train_docs),
        "val_chars": len(val_text),
        "val_text_bytes": len(val_text.encode("utf-8")),
        "val_rows_text_bytes": tok.byte_rule().count_rows(val_rows),  # bytes the val rows hold
        "train": train_stats,
        "val": val_stats,
        "timings_s": {"tokenizer": round(t_tok, 3), "total": None},
    }
    # write: arrays and text first, info.json last (its presence marks a complete cache entry)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(out / tok.file_name)
    _atomic_write(out / "train.npy", lambda f: np.save(f, train_rows))
    _atomic_write(out / "val.npy", lambda f: np.save(f, val_rows))
    _atomic_write(out / "val.txt", lambda f: f.write(val_text.encode("utf-8")))
    info["timings_s"]["total"] = round(time.time() - t_start, 3)
    _atomic_write(info_path, lambda f: f.write(json.dumps(info, indent=2).encode()))
    log(f"data: prepared {out} in {info['timings_s']['total']:.1f}s")
    return Dataset(tokenizer=tok, train_rows=np.load(out / "train.npy", mmap_mode="r"),
                   val_rows=np.load(out / "val.npy", mmap_mode="r"), val_text=val_text, info=info)
