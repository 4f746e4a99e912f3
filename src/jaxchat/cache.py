"""Where jaxchat keeps what it can rebuild: prepared datasets (data/) and compiled programs (compilation.py)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$JAXCHAT_CACHE, else $XDG_CACHE_HOME/jaxchat, else ~/.cache/jaxchat."""
    if os.environ.get("JAXCHAT_CACHE"):
        return Path(os.environ["JAXCHAT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jaxchat"
