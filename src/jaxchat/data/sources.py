"""
Document sources: where text (or pre-tokenized documents) comes from.

A SOURCE on the command line is one of
- `stdlib`                  the embedded corpus (corpus.py), train documents in hash order; `stdlib:val` is
                            its validation split (the same split `prepare_dataset` uses);
- local files               paths, directories (searched recursively) or globs (`data/*.jsonl`, `**` allowed)
                            of `.txt` (one document per file), `.jsonl` (one document per line, its
                            `text_field`), `.parquet` (one per row, column `text_field`); `.txt` and `.jsonl`
                            may be compressed as `.gz` or `.zst` (needs `zstandard`);
- `hf:NAME[:CONFIG]`        a Hugging Face `datasets` dataset, streamed (needs `datasets`), e.g.
                            `hf:allenai/c4:en`, `hf:HuggingFaceFW/fineweb-edu:sample-10BT`; `hf:json` with
                            data_files reads local files through the very same streaming code;
- `.bin` token shards       modded-nanogpt format (shards.py): already tokenized, cut into documents at BOS.

Every source yields documents in a fixed order, and `documents(skip=n)` starts at the n-th, which is what
makes `jaxchat data prepare` resumable. Optional dependencies are imported only when used.
"""

from __future__ import annotations

import glob
import gzip
import importlib
import io
import itertools
import json
import os
import sys
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .corpus import corpus_fingerprint, hash_order, split_train_val, stdlib_documents
from .shards import DataError, iter_shard_documents, read_header

TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet")
COMPRESSED = (".gz", ".zst")


def require(module: str, extra: str, what: str):
    """Import an optional dependency, or fail saying which pip extra brings it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"{what} needs the optional package `{module.split('.')[0]}`: "
                        f"pip install 'jaxchat[{extra}]'") from None


def _kind(path: Path) -> str | None:
    """'txt' | 'jsonl' | 'parquet' | 'bin', ignoring a .gz/.zst suffix, or None for other files."""
    name = path.name.lower()
    for c in COMPRESSED:
        if name.endswith(c):
            name = name[: -len(c)]
            if not name.endswith((".txt", ".jsonl")):
                return None
    for s in TEXT_SUFFIXES + (".bin",):
        if name.endswith(s):
            return s[1:]
    return None


def _text(path: Path, data: bytes) -> str:
    """A text file's contents; a binary file (a NUL byte, or more than 1 in 1000 bytes not UTF-8) is refused."""
    text = data.decode("utf-8", errors="replace")
    bad = text.count("\ufffd")
    if b"\0" in data or bad > len(data) / 1000:
        why = "holds NUL bytes" if b"\0" in data else f"has {bad:,} bytes that are not UTF-8"
        raise DataError(f"{path} is not UTF-8 text: it {why}. Pass text files (convert other encodings with "
                        f"`iconv -t utf-8`), or .bin token shards under a .bin name")
    return text


def _open_binary(path: Path):
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        zstd = require("zstandard", "zstd", f"reading {path}")
        return io.BufferedReader(zstd.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")



def _known_documents(row_group, column: int) -> int | None:
    """Documents (non-null texts) in a Parquet row group from its metadata alone, or None when the file does not
    record the column's null count (the group must then be read to count them)."""
    stats = row_group.column(column).statistics
    if stats is None or not stats.has_null_count:
        return None
    return row_group.num_rows - stats.null_count

class Source:
    """Base class. `tokenized` sources yield token arrays from `token_documents`, the others text."""
    tokenized = False
    kind = ""

    def __init__(self, spec: str):
        self.spec = spec

    def documents(self, skip: int = 0) -> Iterator[str]:
        raise NotImplementedError

    def token_documents(self, skip: int = 0, bos_id: int = 0) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def estimate_docs(self) -> int | None:
        """The number of documents, when it is cheap to know (for the progress bar's ETA)."""
        return None

    def describe(self) -> dict:
        return {"kind": self.kind, "spec": self.spec}


class StdlibSource(Source):
    kind = "stdlib"

    def __init__(self, split: str = "train", val_fraction: float = 0.05):
        super().__init__("stdlib" if split == "train" else f"stdlib:{split}")
        train, val = split_train_val(stdlib_documents(), val_fraction)
        self._docs = hash_order(train) if split == "train" else val
        self.val_fraction = val_fraction

    def documents(self, skip: int = 0) -> Iterator[str]:
        return (text for _, text in self._docs[skip:])

    def estimate_docs(self) -> int:
        return len(self._docs)

    def describe(self) -> dict:
        return {**super().describe(), "python": sys.version.split()[0], "val_fraction": self.val_fraction,
                "fingerprint": corpus_fingerprint(self._docs)}


class FileSource(Source):
    """Local .txt / .jsonl / .parquet files (compressed .txt/.jsonl too), read in the given order."""
    kind = "files"

    def __init__(self, spec: str, files: list[Path], text_field: str = "text"):
        super().__init__(spec)
        self.files = files
        self.text_field = text_field

    def documents(self, skip: int = 0) -> Iterator[str]:
        for path in self.files:
            kind = _kind(path)
            if kind == "txt":
                if skip:
                    skip -= 1
                    continue
                with _open_binary(path) as f:
                    yield _text(path, f.read())
            elif kind == "jsonl":
                skip = yield from self._jsonl(path, skip)
            elif kind == "parquet":
                skip = yield from self._parquet(path, skip)

    def _jsonl(self, path: Path, skip: int):
        with _open_binary(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if skip:  # skipped lines are counted, not parsed
                    skip -= 1
                    continue
                try:
                    record = json.loads(line)
                except ValueError as e:
                    raise DataError(f"{path}:{lineno}: not a JSON line ({e})") from None
                if not isinstance(record, dict) or self.text_field not in record:
                    keys = list(record) if isinstance(record, dict) else type(record).__name__
                    raise DataError(f"{path}:{lineno}: no text field {self.text_field!r} in this JSON line "
                                    f"(it has {keys}); choose the field with --text-field")
                text = record[self.text_field]
                if not isinstance(text, str):
                    raise DataError(f"{path}:{lineno}: field {self.text_field!r} is {type(text).__name__}, "
                                    f"not text; choose another --text-field")
                yield text
        return skip

    def _parquet(self, path: Path, skip: int):
        pq = require("pyarrow.parquet", "datasets", f"reading {path}")
        pf = pq.ParquetFile(path)
        if self.text_field not in pf.schema_arrow.names:
            raise DataError(f"{path} has no column {self.text_field!r} (columns: {pf.schema_arrow.names}); choose "
                            f"the text column with --text-field")
        meta = pf.metadata
        column = pf.schema_arrow.names.index(self.text_field)
        for g in range(meta.num_row_groups):
            docs = _known_documents(meta.row_group(g), column)
            if docs is not None and skip >= docs:  # whole row groups are skipped without reading them
                skip -= docs
                continue
            texts = [t for t in pf.read_row_group(g, columns=[self.text_field]).column(0).to_pylist() if t is not None]
            yield from texts[skip:]
            skip = max(skip - len(texts), 0)  # skip and documents count texts, not rows: null rows are no document
        return skip

    def estimate_docs(self) -> int | None:
        total = 0
        for path in self.files:
            kind = _kind(path)
            if kind == "txt":
                total += 1
            elif kind == "parquet":
                pq = require("pyarrow.parquet", "datasets", f"reading {path}")
                total += pq.ParquetFile(path).metadata.num_rows
            elif kind == "jsonl" and path.suffix.lower() == ".jsonl" and path.stat().st_size < 2**31:
                with open(path, "rb") as f:
                    total += sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 24), b""))
            else:
                return None  # compressed or huge: unknown, no ETA
        return total

    def describe(self) -> dict:
        return {**super().describe(), "text_field": self.text_field,
                "files": [[str(p), p.stat().st_size] for p in self.files]}


class ShardSource(Source):
    """Pre-tokenized `.bin` shards (modded-nanogpt format), cut into documents at the tokenizer's BOS."""
    kind = "shards"
    tokenized = True

    def __init__(self, spec: str, files: list[Path]):
        super().__init__(spec)
        self.files = files
        for path in files:
            read_header(path)  # fail early, naming the bad file

    def token_documents(self, skip: int = 0, bos_id: int = 0) -> Iterator[np.ndarray]:
        return itertools.islice(iter_shard_documents(self.files, bos_id), skip, None)

    def documents(self, skip: int = 0) -> Iterator[str]:
        raise DataError(f"{self.spec} holds token ids, not text: it can be packed (jaxchat data prepare) but not "
                        f"used to train or evaluate a tokenizer")

    def describe(self) -> dict:
        return {**super().describe(), "files": [[str(p), p.stat().st_size] for p in self.files]}


class HFSource(Source):
    """A Hugging Face `datasets` dataset, streamed: nothing is downloaded ahead of use."""
    kind = "hf"

    def __init__(self, spec: str, name: str, config: str | None = None, split: str = "train",
                 text_field: str = "text", data_files: Sequence[str] | None = None):
        super().__init__(spec)
        self.name, self.config, self.split, self.text_field = name, config, split, text_field
        self.data_files = [str(f) for f in data_files] if data_files else None

    def _stream(self):
        if getattr(self, "_ds", None) is not None:  # resolved once; iterating it again starts over
            return self._ds
        datasets = require("datasets", "datasets", f"streaming {self.spec}")
        kwargs = {"data_files": self.data_files} if self.data_files else {}
        try:
            self._ds = datasets.load_dataset(self.name, self.config, split=self.split, streaming=True, **kwargs)
            return self._ds
        except (OSError, ValueError) as e:  # not found, offline (ConnectionError), bad config or split
            raise DataError(f"cannot stream {self.spec} (name {self.name!r}, config {self.config!r}, split "
                            f"{self.split!r}): {type(e).__name__}: {str(e)[:300]}") from None

    def documents(self, skip: int = 0) -> Iterator[str]:
        # skip counts documents, and a row with a null text is none, so rows are counted here, not by ds.skip
        for i, row in enumerate(self._stream()):
            try:
                text = row[self.text_field]
            except KeyError:
                raise DataError(f"{self.spec}: row {i} has no field {self.text_field!r} (fields: {list(row)}); "
                                f"choose it with --text-field") from None
            if text is None:
                continue
            if skip:
                skip -= 1
                continue
            yield text

    def estimate_docs(self) -> int | None:
        try:
            info = self._stream().info
            return int(info.splits[self.split].num_examples) if info.splits else None
        except Exception:  # metadata is a nicety (for the ETA), never a reason to fail
            return None

    def describe(self) -> dict:
        return {**super().describe(), "name": self.name, "config": self.config, "split": self.split,
                "text_field": self.text_field, "data_files": self.data_files}


def _expand(spec: str) -> list[Path]:
    if any(ch in spec for ch in "*?["):
        return [Path(p) for p in sorted(glob.glob(spec, recursive=True)) if Path(p).is_file()]
    p = Path(spec)
    if p.is_dir():
        return sorted(q for q in p.rglob("*") if q.is_file() and _kind(q) is not None and ".tmp" not in q.name)
    return [p] if p.is_file() else []


def open_source(spec: str | Sequence[str], text_field: str = "text", hf_config: str | None = None,
                split: str = "train", data_files: Sequence[str] | None = None) -> Source:
    """Turn what the user typed (one SOURCE, or several file paths/globs) into a Source."""
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not specs:
        raise DataError("no SOURCE given: use stdlib, local files (.txt/.jsonl/.parquet/.bin), or hf:NAME[:CONFIG]")
    specs = [str(s) for s in specs]
    first = specs[0]
    if len(specs) == 1 and first in ("stdlib", "stdlib:train", "stdlib:val"):
        return StdlibSource("val" if first == "stdlib:val" else "train")
    if len(specs) == 1 and first.startswith("hf:"):
        parts = first[3:].split(":")
        if not parts[0] or len(parts) > 2:
            raise DataError(f"{first!r}: write a Hugging Face dataset as hf:NAME or hf:NAME:CONFIG, "
                            f"e.g. hf:allenai/c4:en")
        return HFSource(first, parts[0], parts[1] if len(parts) == 2 else hf_config, split, text_field, data_files)
    files: list[Path] = []
    for s in specs:
        found = _expand(s)
        if not found:
            hint = (f"; for the Hugging Face dataset write hf:{s}" if s.count("/") == 1 and not Path(s).parent.exists()
                    else "")
            raise DataError(f"no data files at {s!r} (a path, directory or glob of .txt/.jsonl/.parquet/.bin "
                            f"files){hint}")
        unknown = [p for p in found if _kind(p) is None]
        if unknown:
            raise DataError(f"{unknown[0]}: unsupported file type; use .txt, .jsonl, .parquet (text, .txt/.jsonl "
                            f"optionally .gz/.zst) or .bin (modded-nanogpt token shards)")
        files.extend(found)
    kinds = {_kind(p) == "bin" for p in files}
    if len(kinds) > 1:
        raise DataError(f"{' '.join(specs)} mixes .bin token shards with text files: prepare them separately")
    if kinds == {True}:
        return ShardSource(" ".join(specs), files)
    return FileSource(" ".join(specs), files, text_field)
