"""JSON and JSON-lines files, shared by run directories (rundir.py), dataset preparation (data/) and interop.
The atomic writes leave a reader the old file or the new one, never half of one, even after a crash or kill -9;
a JSON-lines reader skips the partial last line a killed appender may leave."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, flush it to disk, then rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, obj) -> None:
    _write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """The records of a JSON-lines file and how many unreadable lines were skipped (a process killed while
    writing leaves at most a partial last line)."""
    if not Path(path).is_file():
        return [], 0
    out, bad = [], 0
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            bad += 1
    return out, bad


def write_jsonl_atomic(path: Path, records: list[dict]) -> None:
    _write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def append_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
