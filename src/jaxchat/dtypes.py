"""The dtypes: F32, the one dtype the code names, in which parameters, optimizer state, logits, softmax and every
reduction that must not round (norms, distances, sums of squares) are kept; and `model.compute_dtype`, in which
matmuls run, resolved here (`resolve_compute_dtype`): bfloat16 on accelerators and bf16-capable CPUs, float32 on
other CPUs."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from jaxchat.config import ConfigError

F32 = jnp.float32


CPU_BF16_ENV = "JAXCHAT_CPU_BF16"  # 1 / 0: take the CPU as having bf16 units or not, whatever its flags say


def cpu_has_bf16_units() -> bool:
    """Whether this CPU multiplies bf16 in hardware: AMX-BF16 or AVX512-BF16 among /proc/cpuinfo's flags (Linux;
    elsewhere False). XLA:CPU reaches them through its bf16 GEMMs (model/cpu_dots.py). JAXCHAT_CPU_BF16=0 or 1
    overrides the flags (the test suite sets 0, so its fp32 reference checks do not depend on the host CPU)."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced:
        if forced not in ("0", "1"):
            raise ConfigError(f"{CPU_BF16_ENV}={forced!r}: set 1 (bf16 units: auto computes in bfloat16) or 0 "
                              f"(float32), or unset it to read the CPU's flags")
        return forced == "1"
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def resolve_compute_dtype(name: str) -> str:
    """`model.compute_dtype` as a concrete dtype name: "auto" is bfloat16 on an accelerator (GPU, TPU) and on a CPU
    with bf16 units (AMX-BF16 / AVX512-BF16), float32 on other CPUs. On the CPU the choice was measured: `tiny`'s
    step 1.5x faster in bf16, its loss curve within seed noise of fp32 (docs/LOG.md, session 11). Resolved when a
    run's config is planned (plan.resolve), so a run directory records the concrete dtype and a resume on another
    kind of device is refused rather than silently changing the numerics. Asks JAX for its backend, so call it
    only once JAX may initialise."""
    if name != "auto":
        return name
    return "bfloat16" if jax.default_backend() != "cpu" or cpu_has_bf16_units() else "float32"
