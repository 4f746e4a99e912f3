"""`jaxchat train --dry-run`: what a run will need, known before paying for it.

Everything is done on shapes: the state is `jax.eval_shape` of the initializer (jax.ShapeDtypeStruct leaves),
the batch a ShapeDtypeStruct, and the train step is lowered and compiled from them
(`jit(...).lower(shapes).compile()`), so no parameter or optimizer array is ever allocated. The compiled
program's `memory_analysis()` gives the device memory it needs:

    peak = arguments + outputs - aliased (donated state) + temporaries + generated code

(or XLA's own `peak_memory_in_bytes` where the backend reports a larger one). The limit is the device's `bytes_limit`
(GPU/TPU), or the host RAM for the CPU device (its cgroup limit if lower); `--memory-limit` overrides it, e.g.
to plan for an 80 GB GPU.

The largest device batch (sequences per device per micro-batch) that fits is found by a bracketing search on
compiled programs: the bracket [fits, does-not-fit) shrinks with every probe; a probe is placed on the line
through the last two probes (memory is close to affine in the device batch, so this usually closes the bracket
in a probe or two), and at the bracket's midpoint when that is not converging (bisection). Probes compile with
the run's gradient accumulation.
"""

from __future__ import annotations

import math
import os
import re
import time

import jax
import jax.numpy as jnp

from jaxchat.config import Config, ConfigError
from jaxchat.run import Run
from jaxchat.train import batch_sharding, make_train_step

MAX_DEVICE_BATCH = 4096  # the search stops here (report "at least")


def parse_bytes(text: str) -> int:
    """'80GB', '80GiB', '512M', '1.5e9' -> bytes (decimal for GB/MB, binary for GiB/MiB)."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)(i?)B?\s*", text, flags=re.I)
    if not m:
        raise ConfigError(f"--memory-limit {text!r}: expected a size such as 80GB, 24GiB or 512MiB")
    num, unit, binary = float(m.group(1)), m.group(2).upper(), bool(m.group(3))
    return int(num * (1024 if binary else 1000) ** " KMGT".index(unit or " "))


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1024


def device_memory_limit() -> tuple[int | None, str]:
    """(bytes, what it is) of the first device's memory; for the CPU device, the host RAM."""
    dev = jax.devices()[0]
    try:
        stats = dev.memory_stats() or {}
    except Exception:  # some backends raise instead of returning None
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{dev.device_kind} memory limit (device.memory_stats)"
    if dev.platform == "cpu":
        try:
            import psutil
            total = int(psutil.virtual_memory().total)
        except ImportError:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        try:  # a container's memory limit, if lower
            raw = open("/sys/fs/cgroup/memory.max").read().strip()
            if raw.isdigit() and int(raw) < total:
                return int(raw), "the container's memory limit (cgroup memory.max; CPU device)"
        except OSError:
            pass
        return total, "host RAM (the CPU device's memory)"
    return None, f"unknown ({dev.device_kind} reports no memory limit)"


def peak_bytes(mem) -> int:
    """Arguments + outputs - aliased + temporaries + code. Some backends also report `peak_memory_in_bytes`, but
    XLA:CPU's leaves the temporaries out, so the larger of the two is used."""
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
             + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
    return int(max(total, getattr(mem, "peak_memory_in_bytes", 0) or 0))


def tree_bytes(tree) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def largest_fitting(probe, limit: int, start: int, cap: int = MAX_DEVICE_BATCH, max_probes: int = 8):
    """Largest d in [1, cap] with probe(d) <= limit, for probe non-decreasing in d. Returns (lo, hi, peaks): lo
    the largest d known to fit (0: none), hi the smallest known not to (None: none up to cap), peaks {d: probe(d)}.
    lo is exact when hi == lo + 1 (or lo == cap).

    Every probe lies inside the bracket (lo, hi). It is placed on the line through the last two probes (a secant
    step, exact in one or two probes when memory is affine in d), or at the bracket's midpoint when the secant
    has not halved the bracket over two probes, or has nothing to say (bisection)."""
    peaks: dict[int, int] = {}
    order: list[int] = []
    widths: list[int | None] = []
    kinds: list[str] = ["start"]
    lo, hi = 0, None
    d = max(1, min(start, cap))
    for _ in range(max_probes):
        peaks[d] = probe(d)
        order.append(d)
        if peaks[d] <= limit:
            lo = max(lo, d)
        else:
            hi = d if hi is None else min(hi, d)
        if (hi is not None and hi - lo <= 1) or (hi is None and lo >= cap):
            break
        upper = hi - 1 if hi is not None else cap  # the answer lies in [lo, upper]
        widths.append(upper - lo if hi is not None else None)
        guess = None
        slow = (len(widths) >= 3 and widths[-3] is not None and widths[-1] > widths[-3] / 2
                and kinds[-2:] == ["secant", "secant"])
        kind = "secant"
        if not slow and len(order) >= 2:
            (d1, p1), (d2, p2) = (order[-2], peaks[order[-2]]), (order[-1], peaks[order[-1]])
            if (p2 - p1) * (d2 - d1) > 0:
                guess = min(max(int(d1 + (limit - p1) * (d2 - d1) / (p2 - p1)), lo + 1), upper)
                if guess in peaks:  # the line points at a known probe: its neighbour closes the bracket
                    guess = guess + 1 if peaks[guess] <= limit else guess - 1
        elif not slow and lo == 0:
            guess, kind = 1, "start"  # the first probe does not fit: the smallest batch gives a second point
        if guess is None or not lo < guess <= upper or guess in peaks:  # bisect, or grow while all fit
            guess = (lo + 1 + upper) // 2 if hi is not None else min(2 * max(lo, 1), cap)
            kind = "bisect"
        if not lo < guess <= upper or guess in peaks:
            break
        d = guess
        kinds.append(kind)
    return lo, hi, peaks


def dry_run(cfg: Config, memory_limit: int | None = None, max_probes: int = 8, search: bool = True,
            log=print) -> dict:
    """Compile the train step of `cfg` from shapes only and report its memory; see the module docstring."""
    t_start = time.perf_counter()
    run = Run.build(cfg)  # (shapes only: nothing is allocated)
    cfg, mesh, micro, fns, optimizer, abstract = run.cfg, run.mesh, run.micro, run.fns, run.optimizer, run.abstract
    n, T, A = mesh.size, cfg.model.sequence_len, cfg.train.grad_accum
    param_bytes, opt_bytes = tree_bytes(abstract["params"]), tree_bytes(abstract["opt_state"])
    step = make_train_step(fns, optimizer, averaging=run.averaging)  # (its EMA / SWA buffers count too)

    def compile_peak(accum: int, device_batch: int) -> tuple[int, object]:
        batch = jax.ShapeDtypeStruct((accum, device_batch * n, T), jnp.int32, sharding=batch_sharding(mesh))
        with jax.set_mesh(mesh):  # as loop.py: splash attention shard_maps over a multi-device mesh
            compiled = step.lower(abstract, (batch, batch)).compile()
        return peak_bytes(compiled.memory_analysis()), compiled.memory_analysis()

    t0 = time.perf_counter()
    peak, mem = compile_peak(A, micro // n)
    compile_s = time.perf_counter() - t0
    limit, source = (memory_limit, "--memory-limit") if memory_limit else device_memory_limit()
    out = {"devices": n, "device_kind": jax.devices()[0].device_kind, "batch_size": cfg.train.batch_size,
           "grad_accum": A, "device_batch": micro // n, "sequence_len": T, "param_bytes": param_bytes,
           "optimizer_bytes": opt_bytes, "peak_bytes": peak, "temp_bytes": int(mem.temp_size_in_bytes),
           "compile_s": round(compile_s, 2), "memory_limit": limit, "memory_limit_source": source,
           "fits": None if limit is None else peak <= limit}
    log(f"dry run: {cfg.train.batch_size} sequences x {T} tokens per step = {A} micro-batch(es) x {micro // n} "
        f"sequences on each of {n} {out['device_kind']} device(s); compiled from shapes in {compile_s:.1f}s, "
        f"no parameters allocated")
    log(f"  parameters       {fmt_bytes(param_bytes):>14}")
    log(f"  optimizer state  {fmt_bytes(opt_bytes):>14}")
    log(f"  peak memory      {fmt_bytes(peak):>14}  per device (arguments {fmt_bytes(mem.argument_size_in_bytes)}, "
        f"temporaries {fmt_bytes(mem.temp_size_in_bytes)}, donated state reused)")
    log(f"  memory limit     {fmt_bytes(limit):>14}  {source}")
    if limit is None:
        log("  largest device batch: unknown (no memory limit known; pass --memory-limit, e.g. 80GB)")
        out["largest_device_batch"] = None
        return out
    if search:
        cache = {micro // n: peak}  # probes keep the run's accumulation (memory per micro-batch does not
        # depend on it, but one micro-batch skips the accumulation loop and its gradient buffer)

        def probe(d):
            if d not in cache:
                cache[d] = compile_peak(A, d)[0]
            return cache[d]

        t0 = time.perf_counter()
        best, hi, peaks = largest_fitting(probe, limit, micro // n, max_probes=max_probes)
        out.update(largest_device_batch=best, search_upper=hi, probes={int(k): int(v) for k, v in peaks.items()},
                   search_s=round(time.perf_counter() - t0, 2))
        exact = hi is not None and hi == best + 1
        bound = ("" if exact else f" (search stopped after {len(peaks)} probes: the answer is below {hi})"
                 if hi is not None else f" (at least; the search stops at {MAX_DEVICE_BATCH})")
        probes = ", ".join(f"{d}: {fmt_bytes(p)}" for d, p in sorted(peaks.items()))
        if best == 0:
            log(f"  largest device batch: none fits, even 1 sequence of {T} tokens needs {fmt_bytes(peaks[min(peaks)])}"
                f": use a smaller model or sequence_len, or more memory")
        else:
            per_dev = cfg.train.batch_size // n
            good = max(d for d in range(1, min(best, per_dev) + 1) if per_dev % d == 0)
            log(f"  largest device batch that fits: {best} sequences{bound}; the largest dividing the "
                f"{per_dev} per device is {good}: --set train.device_batch_size={good}")
        log(f"  probes (device batch: peak): {probes}")
    if not out["fits"]:
        log(f"  DOES NOT FIT: the run needs {fmt_bytes(peak)} per device, more than {fmt_bytes(limit)}; lower "
            f"train.device_batch_size (gradient accumulation keeps the batch) or model.sequence_len")
    out["wall_s"] = round(time.perf_counter() - t_start, 2)
    return out


__all__ = ["dry_run", "device_memory_limit", "largest_fitting", "parse_bytes", "peak_bytes"]
