"""The peak FLOP/s that MFU divides by: `--peak-tflops` when given; the device's datasheet bf16 dense peak for the
accelerators model/accounting.py knows; on a CPU, a matmul benchmark at the run's compute dtype, measured once per
machine and kept in the user cache (cache.py: <cache>/peak_flops.json, keyed by CPU model, core count, JAX
version and dtype), so later runs reuse it. A CPU has no datasheet peak that matters here: what its BLAS reaches
on a large square matmul is the ceiling a training step can approach, so MFU on a CPU reads "of the measured
matmul rate"."""

from __future__ import annotations

import json
import os
import platform
import time

import jax
import jax.numpy as jnp

from jaxchat.cache import cache_dir
from jaxchat.fileio import write_json_atomic
from jaxchat.model import cpu_dots
from jaxchat.model.accounting import device_peak_flops

MATMUL_N = 1024  # 2 GFLOP per fp32 matmul: long enough to time, short enough to measure at start-up (~1 s on 2 cores)
MATMUL_N_LOW_PRECISION = 2048  # bf16 GEMMs run ~6x faster on a CPU with bf16 units: 17 GFLOP takes as long
MATMUL_REPS = 5
KEY_VERSION = "f32-accumulated GEMM"  # in the cache key: values measured before this rule are not reused


def cache_file():
    return cache_dir() / "peak_flops.json"


def machine_key(dtype: str) -> str:
    dev = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    return f"{dev.platform}|{dev.device_kind}|{cpu}|{os.cpu_count()} cores|jax {jax.__version__}|{dtype}|{KEY_VERSION}"


def measure_matmul_flops(dtype: str, n: int | None = None, reps: int = MATMUL_REPS) -> float:
    """FLOP/s of the best of `reps` n x n matmuls in `dtype` on the default device, written as the model writes its
    matmuls (cpu_dots.dot: f32 accumulation; a plain bf16 `jnp.matmul` is upcast to an f32 GEMM by XLA:CPU, whose
    rate made a bf16 step's MFU read ~98%)."""
    n = n or (MATMUL_N if jnp.dtype(dtype) == jnp.dtype(jnp.float32) else MATMUL_N_LOW_PRECISION)
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda a, b: cpu_dots.dot(a, b, a.dtype))
    f(a, b).block_until_ready()  # compile and warm up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def read_cache() -> dict:
    try:
        return json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}  # absent or unreadable: measured again and rewritten


def peak_flops(dtype: str, given_tflops: float | None = None, log=print) -> tuple[float | None, str]:
    """(peak FLOP/s per device or None, where it came from) for MFU."""
    if given_tflops:
        return given_tflops * 1e12, "--peak-tflops"
    known = device_peak_flops()
    if known is not None:
        return known, f"{jax.devices()[0].device_kind} datasheet bf16 dense peak"
    if jax.default_backend() != "cpu":
        return None, "unknown device: pass --peak-tflops"
    key, cache = machine_key(dtype), read_cache()
    if key in cache:
        return float(cache[key]), f"{dtype} matmul rate measured on this CPU (cached in {cache_file()})"
    log(f"measuring this CPU's {dtype} matmul rate for MFU (once; cached in {cache_file()})")
    flops = measure_matmul_flops(dtype)
    try:
        cache_file().parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cache_file(), {**read_cache(), key: flops})
    except OSError as e:  # a read-only cache only costs the measurement next time
        log(f"note: could not cache the measured peak in {cache_file()}: {e.strerror}")
    return flops, f"{dtype} matmul rate measured on this CPU"
