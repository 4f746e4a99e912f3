"""Atomic JSON writes, shared by run directories (checkpoint.py), dataset preparation (data/) and interop: a
reader sees the old file or the new one, never half of one, even after a crash or kill -9."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to a temporary file, flush it to disk, then rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
