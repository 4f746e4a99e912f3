"""How jaxchat's commands run XLA:CPU: the step executes on the calling thread and glibc keeps the memory it frees.

XLA:CPU allocates a step's temporaries (the activations kept for the backward, the logits, ...) as one buffer per
execution: ~0.93 GB for the shared CPU benchmark config. With JAX's defaults that buffer is requested on a PJRT
worker thread, whose glibc arena cannot hold anything that large, so every step maps it fresh and the kernel
faults in and zeroes ~240K pages (measured with `perf stat -e minor-faults`: 3.30M faults in 12 steps vs 1.14M
in 3; ~0.4 s of system time per ~1.08 s step on this project's 2-core machine). Two settings make the buffer be
reused instead:

- `jax_cpu_enable_async_dispatch = False`: the step runs on the thread that calls it (the main thread), whose
  allocations come from glibc's main arena, which can grow to any size. A CPU has no device queue for the host to
  run ahead of: the step uses both cores either way.
- `mallopt(M_MMAP_THRESHOLD)` and `mallopt(M_TRIM_THRESHOLD)` at 2 GiB - 1: requests up to that size are carved
  from the heap rather than mapped, and freed memory stays in the heap for the next step instead of being handed
  back to the kernel.

Both are needed (docs/LOG.md, session 8): either alone leaves the cpu-bench step at ~1,060-1,080 ms, together ~870,
with 9x fewer page faults; paired runs of `jaxchat bench`: tiny +26-31% tokens/s, cpu-bench +28-44%. The process
keeps its peak heap (about the step's temporaries) for its lifetime, which is what a training run needs anyway.

Applied by `jaxchat train|eval|sample|bench` (cli.py) before JAX starts, only where JAX will run on the CPU (no
accelerator plugin installed, or `JAX_PLATFORMS` starting with cpu) and the C library is glibc; nothing changes
on GPU/TPU hosts, where the settings were not measured. `JAXCHAT_CPU_RUNTIME=default` keeps JAX's and glibc's
defaults.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import platform
import sys

import jax

from jaxchat.config import ConfigError

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
KEEP_BYTES = 2**31 - 1  # mallopt takes a C int
CHOICES = ("tuned", "default")
TUNED = "sync dispatch, glibc heap kept (cpu_runtime.py)"
_applied = "default"


def choice() -> str:
    raw = os.environ.get("JAXCHAT_CPU_RUNTIME", "tuned").strip().lower() or "tuned"
    if raw not in CHOICES:
        raise ConfigError(f"JAXCHAT_CPU_RUNTIME={raw!r} is not one of {', '.join(CHOICES)}: unset it (tuned) or set "
                          f"default to keep JAX's asynchronous dispatch and glibc's malloc settings")
    return raw


def runs_on_cpu() -> bool:
    """Whether JAX will start on the CPU, decided without starting it: JAX_PLATFORMS (jax_platforms) names cpu
    first, or neither a PJRT plugin (CUDA, ROCm, ...) nor libtpu is installed."""
    platforms = jax.config.jax_platforms
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    if importlib.util.find_spec("libtpu") is not None or importlib.util.find_spec("jax_plugins") is not None:
        return False
    return not list(importlib.metadata.entry_points(group="jax_plugins"))


def backends_started() -> bool:
    """Whether JAX has created its clients already (a library caller that used JAX before calling cli.main): the
    dispatch mode can no longer change then, so nothing is applied. Read from JAX's internals, where it lives;
    should they move, the answer is False and the settings are applied as for a fresh process."""
    try:
        from jax._src.xla_bridge import backends_are_initialized  # (private: may move; imported where it is used)
    except ImportError:
        return False
    return backends_are_initialized()


def is_glibc() -> bool:
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def tune_cpu_runtime() -> str:
    """Apply the settings above when they apply; returns what the process runs with ("default" or TUNED), for
    `jaxchat bench` to print. Call before JAX starts its backends (the dispatch mode is read then)."""
    if choice() == "default" or backends_started() or not runs_on_cpu() or not is_glibc():
        return "default"
    libc = ctypes.CDLL(None)
    if not (libc.mallopt(M_MMAP_THRESHOLD, KEEP_BYTES) and libc.mallopt(M_TRIM_THRESHOLD, KEEP_BYTES)):
        return "default"
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    global _applied
    _applied = TUNED
    return TUNED


def current() -> str:
    """What this process runs with: TUNED once tune_cpu_runtime() has applied the settings, else "default"."""
    return _applied


def synchronous_dispatch() -> bool:
    """Whether a jitted call returns only once its result is computed: on the CPU with async dispatch off (as set
    here, or by the user). The train loop then logs each step's metrics at once instead of one step later."""
    return jax.default_backend() == "cpu" and not jax.config.values.get("jax_cpu_enable_async_dispatch", True)
