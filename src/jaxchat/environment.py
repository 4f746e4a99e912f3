"""What a run ran on and with: the code's commit, the library versions, the devices. Recorded in each run
directory (environment.json) and in every benchmark row."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
from pathlib import Path

import flax
import jax
import optax


def git_commit(root: Path | None = None) -> str:
    """`git rev-parse --short HEAD`, plus -dirty when tracked files differ; $JAXCHAT_COMMIT wins (for machines
    that get a copy of the tree without .git). Read-only: `--no-optional-locks` keeps git off the index."""
    if os.environ.get("JAXCHAT_COMMIT"):
        return os.environ["JAXCHAT_COMMIT"]
    root = root or Path(__file__).resolve().parents[2]
    try:
        run = lambda *a: subprocess.run(["git", "--no-optional-locks", "-C", str(root), *a], capture_output=True,
                                        text=True, timeout=10, check=True).stdout.strip()
        sha = run("rev-parse", "--short", "HEAD")
        return sha + ("-dirty" if run("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_vector_isa() -> str:
    """The widest vector extensions of this x86 CPU (XLA:CPU generates code for them, so float results and
    speed depend on it): 'avx512' (+ '-bf16' / '-fp16'), 'avx2', 'avx', or '' where /proc/cpuinfo says nothing."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        return ""
    for isa in ("avx512f", "avx2", "avx"):
        if isa in flags:
            extra = [x for x in ("avx512_bf16", "avx512_fp16", "amx_tile") if x in flags] if isa == "avx512f" else []
            return "-".join([isa.removesuffix("f")] + [x.split("_")[-1] for x in extra])
    return ""


def cpu_model() -> str:
    """/proc/cpuinfo's `model name` ('AMD EPYC', 'Intel(R) Xeon(R) ...'), or '' where it says nothing: CPU speed
    ratios differ by vendor and generation (torch's bf16 uses AMX where a Xeon has it), so benchmark rows name it."""
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    except OSError:
        return ""


def device_label() -> str:
    devs = jax.devices()
    kind = devs[0].device_kind
    if devs[0].platform == "cpu":
        details = [f"{os.cpu_count()} cores"] + [x for x in (cpu_vector_isa(), cpu_model()) if x]
        kind = f"cpu ({', '.join(details)})"
    return kind + (f" x{len(devs)}" if len(devs) > 1 else "")


def environment() -> dict:
    """environment.json of a run directory."""
    devices = jax.devices()
    return {"jaxchat": importlib.metadata.version("jaxchat"), "commit": git_commit(), "jax": jax.__version__,
            "jaxlib": importlib.metadata.version("jaxlib"), "flax": flax.__version__, "optax": optax.__version__,
            "orbax": importlib.metadata.version("orbax-checkpoint"), "backend": jax.default_backend(),
            "device_kind": devices[0].device_kind, "device": device_label(), "devices": jax.device_count(),
            "local_devices": jax.local_device_count(), "processes": jax.process_count(),
            "cpu_isa": cpu_vector_isa() if devices[0].platform == "cpu" else ""}
