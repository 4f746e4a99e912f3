"""The persistent XLA compilation cache.

Compiling the train step of a d12 model takes tens of seconds (more with unrolled layers); the second run of the
same program (same model, shapes, backend, jax version, XLA flags) loads it from disk instead. jaxchat turns
JAX's persistent cache on for every command that compiles (train, eval, sample, bench), in the user's cache
dir: `$JAXCHAT_CACHE/xla` (default `~/.cache/jaxchat/xla`, see cache.py).

Control it with `JAXCHAT_COMPILE_CACHE`: unset = that default, `off` = no cache, any other value = the cache
directory. A `JAX_COMPILATION_CACHE_DIR` the user set for JAX itself is respected as is. Programs that compile in
under `JAXCHAT_COMPILE_CACHE_MIN_SECONDS` (default 1, JAX's own default) are not stored: the cache is for the
train step, not for every small function (the test suite lowers it to share its many small compiles).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import jax

from jaxchat.cache import cache_dir
from jaxchat.config import ConfigError

OFF = ("0", "off", "false", "no", "none")


def compilation_cache_dir() -> Path | None:
    """Where compiled programs are stored, or None when the cache is turned off."""
    choice = os.environ.get("JAXCHAT_COMPILE_CACHE", "").strip()
    if choice.lower() in OFF:
        return None
    if choice:
        return Path(choice).expanduser()
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"]).expanduser()
    return cache_dir() / "xla"


def enable_compilation_cache() -> Path | None:
    """Point JAX's persistent compilation cache at `compilation_cache_dir()` (idempotent). Returns the directory,
    or None when the cache is off. A directory that cannot be created is not fatal: a warning, then no cache."""
    path = compilation_cache_dir()
    if path is None:
        return None
    raw = os.environ.get("JAXCHAT_COMPILE_CACHE_MIN_SECONDS", "1")
    try:
        min_seconds = float(raw)
    except ValueError:
        raise ConfigError(f"JAXCHAT_COMPILE_CACHE_MIN_SECONDS={raw!r} is not a number of seconds: unset it (default "
                          f"1) or give e.g. 0.5") from None
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"jaxchat: compilation cache off: cannot create {path} ({e.strerror}); set JAXCHAT_COMPILE_CACHE to a "
              f"writable directory or to off", file=sys.stderr)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_seconds)
    return path
