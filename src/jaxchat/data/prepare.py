"""
`jaxchat data prepare`: SOURCE -> tokenizer -> token shards + manifest -> packed rows, in a directory.

    DIR/tokenizer.json           the tokenizer the ids belong to (tokenizer.model for a sentencepiece model)
    DIR/tokens/val_000000.bin    token shards (shards.py format): whole documents, each prefixed with BOS;
    DIR/tokens/train_000000.bin  uint16 when the vocab fits in 65536 ids, else uint32
    DIR/manifest.json            source, tokenizer sha256, options, per-shard docs/tokens/sha256, totals and
                                 `dataset_id` (sha256 of the tokenizer and every shard's checksum); written last
    DIR/rows-t1024/{train,val}.bin + pack.json
                                 rows of T+1 tokens packed offline by BOS best-fit (docs/architecture.md §Data), so training only
                                 memory-maps them; made by --seq T, or on first use by load_for_training

Validation documents are the first `val_docs` documents of SOURCE (or all of `val_source`); the stdlib corpus
uses its own file-hash split by default. Tokenization runs on all cores (HF `encode_batch`, in Rust, while a
thread reads the next batch of text). A shard is closed after the first document that brings it to
`shard_tokens` tokens, so shard boundaries depend only on the document stream: an interrupted run resumes
from `progress.json` shard by shard (completed shards are kept, the source is skipped past their documents)
and ends byte-identical to an uninterrupted one. The manifest holds no timestamps, for the same reason.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import queue
import threading
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from jaxchat.fileio import write_json_atomic

from .loader import put_unless_stopped
from .packing import PACK_BUFFER, iter_pack_bestfit, iter_split_long_docs
from .shards import DataError, ShardWriter, dtype_for_vocab, iter_shard_documents
from .sources import Source, StdlibSource
from .tokenizer import Tokenizer

PREPARE_VERSION = 1
PACK_VERSION = 1
DEFAULT_VAL_DOCS = 1000
DEFAULT_SHARD_TOKENS = 100_000_000  # modded-nanogpt's shard size: 200 MB of uint16
BATCH_DOCS = 512  # documents per encode_batch call


def _read_ahead(it, depth: int = 2):
    """Iterate `it` on a background thread, `depth` items ahead (reading and JSON parsing overlap with the
    tokenizer, which releases the GIL). Exceptions are re-raised in the consumer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work():
        try:
            for item in it:
                if not put_unless_stopped(q, item, stop):
                    return
            put_unless_stopped(q, done, stop)
        except BaseException as e:  # handed to the consumer
            put_unless_stopped(q, e, stop)

    t = threading.Thread(target=work, daemon=True, name="jaxchat-read-ahead")
    t.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def token_batches(source: Source, tok: Tokenizer, skip: int, limit: int | None, dtype,
                  batch_docs: int = BATCH_DOCS):
    """Yield (flat tokens, doc ends) per batch of documents: every document BOS-prefixed, in `dtype`;
    ends[i] is the end offset of document i within flat."""
    bos = tok.bos_id
    if source.tokenized:
        docs = itertools.islice(source.token_documents(skip, bos), limit)
        for batch in iter(lambda: list(itertools.islice(docs, batch_docs)), []):
            batch = [d if d.size and d[0] == bos else np.concatenate([np.array([bos], np.int64), d]) for d in batch]
            flat = np.concatenate(batch)
            if int(flat.max()) >= tok.vocab_size:
                raise DataError(f"{source.spec} holds token id {int(flat.max())} but the tokenizer has only "
                                f"{tok.vocab_size} ids: these shards were made with another tokenizer; pass that one")
            yield flat.astype(dtype, copy=False), np.cumsum([d.size for d in batch])
        return
    texts = itertools.islice(source.documents(skip), limit)
    batches = iter(lambda: list(itertools.islice(texts, batch_docs)), [])
    for batch in _read_ahead(batches):
        ids = tok.encode_batch(batch)
        ends = np.cumsum([len(x) + 1 for x in ids])
        flat = np.fromiter(itertools.chain.from_iterable(itertools.chain((bos,), x) for x in ids),
                           dtype=dtype, count=int(ends[-1]))
        yield flat, ends


def _progress(total, initial, desc, enabled):
    return tqdm(total=total, initial=initial, desc=desc, unit="doc", dynamic_ncols=True,
                smoothing=0.1, disable=None if enabled else True)


def _params(source, val_source, val_docs, max_docs, shard_tokens, tok, dtype, max_tokens: int = 0) -> dict:
    params = {"version": PREPARE_VERSION, "source": source.describe(),
              "val_source": val_source.describe() if val_source else None, "val_docs": val_docs,
              "max_docs": max_docs, "shard_tokens": shard_tokens, "tokenizer_sha256": tok.fingerprint(),
              "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "dtype": np.dtype(dtype).name}
    if max_tokens:  # (only when set: a dataset prepared before the option existed keeps its params)
        params["max_tokens"] = max_tokens
    return params


def _diff(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def prepare_source(source: Source, tok: Tokenizer, out: str | os.PathLike, val_docs: int | None = None,
                   val_source: Source | None = None, seq: int | None = None,
                   shard_tokens: int = DEFAULT_SHARD_TOKENS, max_docs: int = 0, split_long: bool = True,
                   pack_buffer: int = PACK_BUFFER, progress: bool = True, log=print, max_tokens: int = 0) -> dict:
    """Tokenize `source` into shards under `out` (resuming an interrupted run), write the manifest, and pack
    rows of seq+1 tokens if `seq` is given. Returns the manifest. `max_tokens` > 0 stops the train split at the
    first document boundary at or past that many tokens (BOS included): a token budget without the whole
    source (e.g. the seed cards' C4 tokens)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file, not a directory: choose a new directory for the dataset")
    if val_docs is None and val_source is None:
        if isinstance(source, StdlibSource) and source.spec == "stdlib":
            val_source = StdlibSource("val")
        else:
            val_docs = DEFAULT_VAL_DOCS
    if val_docs is not None and val_docs < 0 or max_docs < 0 or shard_tokens < 1:
        raise DataError(f"val_docs={val_docs}, max_docs={max_docs} must be >= 0 and shard_tokens={shard_tokens} > 0")
    if val_docs == 0 and val_source is None:
        raise DataError("training needs a validation split: give --val-docs N (N > 0) or a --val SOURCE")
    dtype = dtype_for_vocab(tok.vocab_size)
    if max_tokens < 0:
        raise DataError(f"max_tokens={max_tokens} must be >= 0 (0: the whole source)")
    params = _params(source, val_source, val_docs, max_docs, shard_tokens, tok, dtype, max_tokens)
    manifest_path = out / "manifest.json"
    if manifest_path.is_file():
        manifest = _read_same_params(manifest_path, params, "already holds a dataset prepared",
                                     f"choose another --out, or delete {out} to prepare it again")
        log(f"data: {out} is already prepared ({manifest['train']['tokens']:,} train tokens)")
    else:
        manifest = _tokenize(source, val_source, tok, out, params, progress, log)
    if seq:
        pack(out, manifest, seq, out / rows_dir_name(seq, split_long, pack_buffer), split_long, pack_buffer, log)
    return manifest


def _read_same_params(path: Path, params: dict, what: str, fix: str) -> dict:
    """The JSON at `path` (manifest or progress), refused when its "params" differ from `params`."""
    obj = json.loads(path.read_text())
    changed = _diff(obj["params"], params)
    if changed:
        raise DataError(f"{path.parent} {what} with other settings ({', '.join(changed)} differ): {fix}")
    return obj


def _tokenize(source, val_source, tok, out, params, progress, log) -> dict:
    progress_path = out / "progress.json"
    tokens_dir = out / "tokens"
    if progress_path.is_file():
        state = _read_same_params(progress_path, params, "holds an interrupted prepare",
                                  f"rerun it with its own settings to finish it, or delete {out} to start over")
        log(f"data: resuming {out}: {len(state['shards'])} shard(s) already done")
    else:
        if out.exists() and any(out.iterdir()):
            raise DataError(f"--out {out} exists and is not a dataset being prepared: choose an empty or new directory")
        state = {"params": params, "shards": [], "complete": []}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(progress_path, state)  # first: from here on, `out` is a dataset being prepared
    tokens_dir.mkdir(exist_ok=True)
    for stale in tokens_dir.glob("*.tmp*"):  # left by a killed writer
        stale.unlink()
    tok.save(out / tok.file_name)
    dtype = np.dtype(params["dtype"])
    val_docs, max_docs = params["val_docs"], params["max_docs"]

    for split in ("val", "train"):
        if split in state["complete"]:
            continue
        done = [s for s in state["shards"] if s["split"] == split]
        skip = sum(s["docs"] for s in done)
        if split == "val":
            src = val_source or source
            limit = None if val_docs is None else val_docs - skip
            offset = 0
        else:
            src = source
            limit = max_docs - skip if max_docs else None
            offset = 0 if val_source else val_docs
        total = src.estimate_docs()
        if total is not None:
            total = max(total - offset, 0)
            total = min(total, skip + limit) if limit is not None else total
        elif limit is not None:
            total = skip + limit
        budget = params.get("max_tokens", 0) - sum(s["tokens"] for s in done) if split == "train" else 0
        t0, docs, tokens = time.time(), 0, 0
        writer, shard_docs = None, 0
        bar = _progress(total, skip, split, progress)

        def close_shard():
            nonlocal writer, shard_docs
            writer.close()
            rec = {"name": writer.path.name, "split": split, "docs": shard_docs, "tokens": writer.count,
                   "sha256": writer.sha256}
            state["shards"].append(rec)
            write_json_atomic(progress_path, state)  # after the rename: a listed shard is always complete
            if bar.disable:
                log(f"data: wrote {rec['name']}: {rec['docs']:,} docs, {rec['tokens']:,} tokens")
            writer, shard_docs = None, 0

        try:
            for flat, ends in token_batches(src, tok, offset + skip, limit, dtype):
                reached = params.get("max_tokens", 0) and split == "train" and tokens + int(ends[-1]) >= budget
                if reached:  # the train token budget ends inside this batch: keep its documents up to it
                    ends = ends[: int(np.searchsorted(ends, budget - tokens)) + 1]
                    flat = flat[: int(ends[-1])]
                first = 0  # index of the first document of this batch not yet written
                while first < ends.size:
                    if writer is None:
                        n = sum(1 for s in state["shards"] if s["split"] == split)
                        writer = ShardWriter(tokens_dir / f"{split}_{n:06d}.bin", dtype)
                    base = int(ends[first - 1]) if first else 0
                    last = int(np.searchsorted(ends, base + params["shard_tokens"] - writer.count))
                    stop = min(last, ends.size - 1)
                    writer.write(flat[base:int(ends[stop])])
                    shard_docs += stop + 1 - first
                    first = stop + 1
                    if last < ends.size:
                        close_shard()
                docs += ends.size
                tokens += int(ends[-1])
                bar.update(ends.size)
                bar.set_postfix_str(f"{tokens / max(time.time() - t0, 1e-9) / 1e6:.2f}M tok/s", refresh=False)
                if reached:
                    break
            if writer is not None:
                close_shard()
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        finally:
            bar.close()
        state["complete"].append(split)
        write_json_atomic(progress_path, state)
        dt = time.time() - t0
        log(f"data: {split}: tokenized {docs:,} docs, {tokens:,} tokens in {dt:.1f}s "
            f"({tokens / max(dt, 1e-9) / 1e6:.2f}M tok/s, {docs / max(dt, 1e-9):,.0f} docs/s)")

    totals = {}
    for split in ("train", "val"):
        shards = [s for s in state["shards"] if s["split"] == split]
        totals[split] = {"shards": len(shards), "docs": sum(s["docs"] for s in shards),
                         "tokens": sum(s["tokens"] for s in shards)}
        if not shards:
            raise DataError(f"the {split} split of {source.spec} is empty: "
                            + ("lower --val-docs" if split == "train" and not val_source else "give more data"))
    h = hashlib.sha256(params["tokenizer_sha256"].encode())
    for s in state["shards"]:
        h.update(f"{s['name']}:{s['sha256']}".encode())
    manifest = {"format": "jaxchat-dataset", "params": params, "shards": state["shards"], **totals,
                "dataset_id": h.hexdigest()}
    write_json_atomic(out / "manifest.json", manifest)
    progress_path.unlink()
    log(f"data: prepared {out}: train {totals['train']['docs']:,} docs / {totals['train']['tokens']:,} tokens in "
        f"{totals['train']['shards']} shard(s), val {totals['val']['docs']:,} docs / {totals['val']['tokens']:,} "
        f"tokens; dataset_id {manifest['dataset_id'][:16]}")
    return manifest


def rows_dir_name(seq: int, split_long: bool = True, pack_buffer: int = PACK_BUFFER) -> str:
    """rows-t1024 for the default packing; other packings get their own directory (rows-t1024-b64-crop)."""
    return (f"rows-t{seq}" + ("" if pack_buffer == PACK_BUFFER else f"-b{pack_buffer}")
            + ("" if split_long else "-crop"))


def pack_signature(manifest: dict, seq: int, split_long: bool, pack_buffer: int) -> dict:
    return {"version": PACK_VERSION, "dataset_id": manifest["dataset_id"], "row_len": seq + 1,
            "split_long": split_long, "pack_buffer": pack_buffer}


def read_pack_info(rows_dir: Path, sig: dict) -> dict | None:
    """rows_dir's pack.json when it holds rows packed with signature `sig` (pack_signature), else None."""
    path = rows_dir / "pack.json"
    if not path.is_file():
        return None
    info = json.loads(path.read_text())
    return info if {k: info.get(k) for k in sig} == sig else None


def pack(dataset_dir: Path, manifest: dict, seq: int, rows_dir: Path, split_long: bool = True,
         pack_buffer: int = PACK_BUFFER, log=print) -> dict:
    """Pack both splits' token shards into rows of seq+1 tokens under rows_dir (skipped if already there).
    Returns pack.json: the signature plus, per split, best-fit stats and the rows file's sha256."""
    sig = pack_signature(manifest, seq, split_long, pack_buffer)
    info = read_pack_info(rows_dir, sig)
    if info is not None:
        return info
    rows_dir.mkdir(parents=True, exist_ok=True)
    for stale in rows_dir.glob("*.tmp*"):  # left by a writer killed while packing (this pack rewrites both splits)
        stale.unlink()
    row_len, bos = seq + 1, manifest["params"]["bos_id"]
    dtype = np.dtype(manifest["params"]["dtype"])
    info = dict(sig)
    for split in ("train", "val"):
        t0 = time.time()
        paths = [dataset_dir / "tokens" / s["name"] for s in manifest["shards"] if s["split"] == split]
        docs = iter_shard_documents(paths, bos)
        if split_long:
            docs = iter_split_long_docs(docs, row_len, bos)
        stats: dict = {}
        with ShardWriter(rows_dir / f"{split}.bin", dtype) as w:
            for block in iter_pack_bestfit(docs, row_len, bos, pack_buffer, stats):
                w.write(block)
        stats["sha256"] = w.sha256
        if stats["rows"] == 0:
            raise DataError(f"the {split} split ({stats['tokens_in']:,} tokens) packs into 0 rows of {row_len} "
                            f"tokens: use a shorter sequence length or more data")
        info[split] = stats
        lost = stats["tokens_cropped"] / max(stats["tokens_in"], 1)
        log(f"data: packed {split}: {stats['rows']:,} rows x {row_len}; best-fit cropped {stats['tokens_cropped']:,} "
            f"tokens ({lost:.2%}), dropped {stats['tokens_dropped']:,} (the partial last row) "
            f"[{time.time() - t0:.1f}s]")
    write_json_atomic(rows_dir / "pack.json", info)
    return info
