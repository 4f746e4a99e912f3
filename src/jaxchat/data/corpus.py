"""
The embedded default corpus: the running Python's own standard library.

Every Python install carries ~14 MB of well-written English and code: the source of the stdlib modules and
the pydoc help topics. That makes a corpus that needs no download, is the same on every machine with the
same Python build, and is big enough to train small models for real.

Documents are (name, text) pairs:
- `json/decoder.py`: the exact UTF-8 source of a stdlib module (CRLF and all, no newline translation);
- `pydoc:topic`: one pydoc help topic from `pydoc_data.topics.topics`.

Left out: `site-packages`, every test suite (directories named `test`, `tests`, `idle_test`, files named
`test_*.py`), `__pycache__`, files that are not valid UTF-8 (a few test fixtures with encoding cookies), and
`pydoc_data/topics.py` itself, whose content enters as the individual topics instead.

Train/val split is by file, from a stable hash of the name (sha1), so a file is never in both and the split
never changes between runs, machines or Python processes.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sysconfig
from pathlib import Path

Doc = tuple[str, str]

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
SKIP_FILES = {"pydoc_data/topics.py"}  # its topics are added one document each, see below


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@functools.lru_cache(maxsize=1)
def _stdlib_documents_cached() -> tuple[Doc, ...]:
    root = _stdlib_root()
    docs: list[Doc] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]  # prune in place: os.walk will not descend
        for fname in filenames:
            if not fname.endswith(".py") or fname.startswith("test_"):
                continue
            path = Path(dirpath) / fname
            name = path.relative_to(root).as_posix()
            if name in SKIP_FILES:
                continue
            try:
                text = path.read_bytes().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue  # unreadable or not UTF-8: not part of the corpus
            if text:
                docs.append((name, text))
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some minimal Python builds drop pydoc_data
        topics = {}
    docs.extend((f"pydoc:{key}", text) for key, text in topics.items() if text)
    docs.sort(key=lambda d: d[0])
    return tuple(docs)


def stdlib_documents() -> list[Doc]:
    """All documents of the embedded corpus as (name, text), sorted by name. Cached per process."""
    return list(_stdlib_documents_cached())


def doc_hash(name: str) -> int:
    """A stable 64-bit hash of a document name (sha1; Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha1(name.encode("utf-8")).digest()[:8], "big")


def split_train_val(docs: list[Doc], val_fraction: float = 0.05) -> tuple[list[Doc], list[Doc]]:
    """Split by file: a document goes to val iff its name hashes below val_fraction. Order is preserved."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must lie in [0, 1)")
    threshold = int(val_fraction * 2**64)
    train, val = [], []
    for doc in docs:
        (val if doc_hash(doc[0]) < threshold else train).append(doc)
    return train, val


def hash_order(docs: list[Doc]) -> list[Doc]:
    """The documents in a fixed pseudo-random order (by name hash), so that any prefix is a fair sample."""
    return sorted(docs, key=lambda d: (doc_hash(d[0]), d[0]))


def take_chars(docs: list[Doc], max_chars: int) -> list[Doc]:
    """The prefix of `docs` holding exactly min(max_chars, total) characters; the last one may be cut short.
    max_chars <= 0 means everything."""
    if max_chars <= 0:
        return list(docs)
    out, total = [], 0
    for name, text in docs:
        if total >= max_chars:
            break
        text = text[: max_chars - total]
        out.append((name, text))
        total += len(text)
    return out


def corpus_fingerprint(docs: list[Doc]) -> str:
    """sha256 over every name and text, in order: changes iff the corpus changes."""
    h = hashlib.sha256()
    for name, text in docs:
        h.update(name.encode("utf-8") + b"\0")
        h.update(text.encode("utf-8") + b"\0")
    return h.hexdigest()


def corpus_stats(docs: list[Doc]) -> dict:
    """Document, character and UTF-8 byte counts."""
    return {
        "docs": len(docs),
        "chars": sum(len(t) for _, t in docs),
        "bytes": sum(len(t.encode("utf-8")) for _, t in docs),
    }
