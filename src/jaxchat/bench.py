"""`jaxchat bench`: the training step's speed, MFU and memory on random tokens, printed; `--record FILE` also
appends them as one row to FILE's results table (BENCHMARKS.md's format).

It builds a preset's model and optimizer exactly as training does (`ModelFns`, `build_optimizer`,
`make_train_step`, `init_state`), compiles the step (timed on its own), runs warm-up steps, then times the
step in up to three windows (the device is synchronised at the end of each window, never inside one) and
reports the median window. A step is one micro-batch by default; `--accum N` makes it N micro-batches with
their gradients accumulated and one optimizer update, as `jaxchat train` runs a preset whose batch is larger
than one device's (nanochat-d12 on one GPU: 8 x 32 sequences). Tokens are uniform random ids, so no data
pipeline is measured: this is the ceiling a real run approaches. MFU follows docs/architecture.md §Counts (`model.accounting`):
FLOPs/token x tokens/s over the device's bf16 dense peak.

Peak memory is the device's own `peak_bytes_in_use` where the runtime reports it (GPU, TPU: the whole process,
parameters and optimizer state included); elsewhere (CPU) XLA's estimate of the compiled step (arguments +
outputs + temporaries - donated aliases) is shown instead, marked `~`.

`--profile DIR` also writes a `jax.profiler` trace of a few steps; the model labels its parts with named scopes
(embed, attention, mlp, lm_head, loss, optimizer), and `benchmarks/trace_summary.py DIR` totals device time per
scope (on CPU, the time of XLA:CPU's ops, which the trace labels with their HLO names too).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import flax
import jax
import jax.numpy as jnp

from jaxchat import cpu_runtime
from jaxchat.config import ATTENTION_BACKENDS, ConfigError
from jaxchat.overrides import apply_overrides
from jaxchat.dryrun import peak_bytes
from jaxchat.environment import device_label, git_commit
from jaxchat.model.accounting import count, device_peak_flops, mfu
from jaxchat.model.gpt import resolved_kernels
from jaxchat.model.scan import describe as describe_layers
from jaxchat.plan import resolve
from jaxchat.presets import get_preset
from jaxchat.run import Run
from jaxchat.train import (batch_sharding, init_state, make_train_step, replicated, resolve_streams, shaped_batch,
                           step_compiler_options)

HEADER = ("| date | commit | device | jax / flax | preset | config deltas | batch | seq | dtype | backend | "
          "tok/s | MFU | peak mem | compile s | step ms | notes |")
# keys that have their own column, left out of "config deltas"
OWN_COLUMNS = ("model.sequence_len", "model.compute_dtype", "model.attention", "train.batch_size", "train.grad_accum",
               "train.device_batch_size", "train.num_steps")  # the last three: bench times one micro-batch per step


def flat(cfg) -> dict:
    return {f"{sec}.{k}": v for sec, sub in cfg.to_dict().items() for k, v in sub.items()}


def config_deltas(base, cfg) -> list[str]:
    """`section.key=value` for every value that differs from the preset, except those with their own column."""
    b, c = flat(base), flat(cfg)
    return [f"{k}={c[k]}" for k in c if c[k] != b[k] and k not in OWN_COLUMNS]


def bench_config(preset: str, sets: list[str], batch: int | None = None, seq: int | None = None,
                 backend: str | None = None, dtype: str | None = None, accum: int = 1):
    """(preset config, bench config): the preset with --set overrides and its horizon/batch rules resolved
    (`plan.resolve`), then `accum` micro-batches of `batch` sequences per step (default one micro-batch, no
    accumulation; batch defaults to the preset's micro-batch) and the seq/backend/dtype choices (defaults: the
    preset's, i.e. `auto`: cuDNN/splash attention and bf16 compute on accelerators, the `cpu` attention backend
    on CPU, bf16 there where the CPU has bf16 units)."""
    base = get_preset(preset)
    cfg = resolve(apply_overrides(base, sets), jax.device_count())
    micro = batch or cfg.train.batch_size // cfg.train.grad_accum
    if not (isinstance(accum, int) and accum >= 1):
        raise ConfigError(f"--accum {accum!r}: micro-batches per step must be an integer >= 1")
    extra = ["train.device_batch_size=0" if getattr(cfg.train, "device_batch_size", 0) else None,
             f"train.grad_accum={accum}", f"train.batch_size={micro * accum}",
             f"model.sequence_len={seq}" if seq else None, f"model.attention={backend}" if backend else None,
             f"model.compute_dtype={dtype}" if dtype else None]
    return base, apply_overrides(cfg, [e for e in extra if e])


def peak_device_memory() -> int | None:
    stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
    return (stats or {}).get("peak_bytes_in_use")


def compiled_memory_estimate(compiled) -> int | None:
    """XLA's peak-memory figure for the compiled step, the same as `--dry-run` reports (dryrun.peak_bytes)."""
    try:
        return peak_bytes(compiled.memory_analysis())
    except Exception:  # not every backend or version implements it
        return None


def run_bench(preset: str, cfg, base=None, *, steps: int = 10, warmup: int = 2, profile_dir: str | None = None,
              seed: int = 0, log=print) -> dict:
    """Compile and time cfg's training step; returns every reported field as a dict."""
    run = Run.build(cfg)  # the model and optimizer exactly as `jaxchat train` builds them
    cfg, mesh, fns, optimizer = run.cfg, run.mesh, run.fns, run.optimizer
    m, B, T = cfg.model, cfg.train.batch_size, cfg.model.sequence_len
    counts = count(m)
    peak = device_peak_flops()
    kernels = resolved_kernels(m)

    t0 = time.perf_counter()
    state = jax.device_put(init_state(fns, optimizer, seed), replicated(mesh))
    tokens = jax.random.randint(jax.random.key(seed + 1), (B, T + 1), 0, m.vocab_size, jnp.int32)
    batch = jax.device_put(shaped_batch(tokens[:, :-1], tokens[:, 1:], cfg.train.grad_accum), batch_sharding(mesh))
    jax.block_until_ready((state, batch))
    init_s = time.perf_counter() - t0

    events = []  # a persistent-cache hit makes "compile time" a load time: say so in the report
    jax.monitoring.register_event_listener(lambda name, **_: events.append(name))
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):  # as loop.py: splash attention shard_maps over a multi-device mesh
        step = make_train_step(fns, optimizer).lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    compile_cached = "/jax/compilation_cache/cache_hits" in events
    estimate = compiled_memory_estimate(step)

    t0 = time.perf_counter()
    for _ in range(warmup):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    warmup_s = time.perf_counter() - t0

    windows = [steps // 3 + (i < steps % 3) for i in range(min(3, steps))]
    times = []
    for n in windows:
        t0 = time.perf_counter()
        for _ in range(n):
            state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        times.append((time.perf_counter() - t0) / n)
    step_s = statistics.median(times)
    loss = float(metrics["loss"])

    if profile_dir:  # the optimized HLO maps kernels back to named scopes (benchmarks/trace_summary.py)
        Path(profile_dir).mkdir(parents=True, exist_ok=True)
        (Path(profile_dir) / "step.hlo.txt").write_text(step.as_text())
        with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
            for _ in range(3):
                state, metrics = step(state, batch)
            jax.block_until_ready((state, metrics))

    tps = B * T / step_s
    u = mfu(counts.flops["total"], tps, peak, mesh.size)
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "commit": git_commit(), "device": device_label(),
        "jax": jax.__version__, "flax": flax.__version__, "preset": preset,
        "deltas": config_deltas(base, cfg) if base is not None else [], "batch": B, "seq": T,
        "grad_accum": cfg.train.grad_accum, "dtype": m.compute_dtype, "backend": m.attention,
        "backend_resolved": kernels["attention"], "tokens_per_step": B * T, "step_s": step_s, "step_s_windows": times,
        "tokens_per_s": tps, "tflops": counts.flops["total"] * tps / 1e12, "mfu": u, "peak_flops": peak,
        "flops_per_token": counts.flops, "params": counts.params, "peak_mem_bytes": peak_device_memory(),
        "cpu_runtime": cpu_runtime.current() if jax.default_backend() == "cpu" else "",
        "xla_mem_estimate_bytes": estimate, "compile_s": compile_s, "compile_cached": compile_cached, "init_s": init_s, "warmup_s": warmup_s,
        "warmup_steps": warmup, "timed_steps": sum(windows), "loss": loss, "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "compiler_options": step_compiler_options(),
        "profile_dir": profile_dir or "", "layers": describe_layers(m), "remat": m.remat,
        "rope_norm": kernels["rope_norm"], "loss_chunk": kernels["loss_chunk"],
        "batch_streams": resolve_streams(m.batch_streams, run.micro, T),
    }


def gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def mem_text(r: dict) -> str:
    return gib(r["peak_mem_bytes"]) if r["peak_mem_bytes"] is not None else "~" + gib(r["xla_mem_estimate_bytes"])


def backend_text(r: dict) -> str:
    return r["backend"] if r["backend"] == r["backend_resolved"] else f"{r['backend']}->{r['backend_resolved']}"


def mfu_text(r: dict) -> str:
    return "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"


def human(n: float) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:,.2f}{unit}"
    return f"{n:,.0f}"


def flops_rate(x: float) -> str:
    return f"{x / 1e12:.1f} TFLOP/s" if x >= 1e12 else f"{x / 1e9:.1f} GFLOP/s"


def split_text(d: dict, order: list[str]) -> str:
    total = d["total"]
    return " | ".join(f"{k} {human(d[k])} {100 * d[k] / total:.1f}%" for k in order if d.get(k))


def format_report(r: dict) -> str:
    f, p = r["flops_per_token"], r["params"]
    w = r["step_s_windows"]
    peak = "unknown peak" if r["peak_flops"] is None else f"peak {r['peak_flops'] / 1e12:.1f} TFLOP/s"
    lines = [
        f"bench {r['preset']} | {r['device']} | jax {r['jax']} flax {r['flax']} | commit {r['commit']}",
        f"config: batch {batch_text(r)} x seq {r['seq']} = {r['tokens_per_step']:,} tokens/step | {r['dtype']} | "
        f"attention {backend_text(r)} | deltas: {', '.join(r['deltas']) or '-'}",
        f"params: {p['total']:,} ({split_text(p, ['embed', 'value_embeds', 'attention', 'mlp', 'lm_head', 've_gates', 'scalars'])})",
        f"FLOPs/token: {human(f['total'])} ({split_text(f, ['lm_head', 'mlp', 'attention', 'gates'])})",
        f"layers: {r['layers']} | remat {r['remat']} | rope+qk-norm {r.get('rope_norm', '?')} "
        f"| loss chunk {r.get('loss_chunk') or 'off'} | streams {r.get('batch_streams', '?')}",
        f"compile: {r['compile_s']:.1f} s{' (loaded from the persistent compilation cache)' * r['compile_cached']}"
        f" | init {r['init_s']:.1f} s | warmup {r['warmup_steps']} steps "
        f"{r['warmup_s']:.1f} s",
        f"step time: {1e3 * r['step_s']:.1f} ms (median of {len(w)} windows, {r['timed_steps']} steps; "
        f"{1e3 * min(w):.1f}..{1e3 * max(w):.1f} ms)",
        f"tokens/s: {r['tokens_per_s']:,.0f} | {flops_rate(r['tflops'] * 1e12)} | MFU {mfu_text(r)} ({peak})",
        f"peak memory: {gib(r['peak_mem_bytes'])} (device) | XLA estimate of the step {gib(r['xla_mem_estimate_bytes'])}",
        f"loss on random tokens (sanity): {r['loss']:.3f}",
    ]
    if r.get("cpu_runtime"):
        lines.append(f"cpu runtime: {r['cpu_runtime']}")
    if r["xla_flags"]:
        lines.append(f"XLA_FLAGS: {r['xla_flags']}")
    if r.get("compiler_options"):
        lines.append(f"step compiled with: {options_text(r)} (train.step_compiler_options)")
    if r["profile_dir"]:
        lines.append(f"profile: {r['profile_dir']} (summarise with python benchmarks/trace_summary.py {r['profile_dir']})")
    return "\n".join(lines)


def batch_text(r: dict) -> str:
    """Sequences per step: "32", or "32 x8" for 8 accumulated micro-batches of 32."""
    accum = r.get("grad_accum", 1)
    return str(r["batch"]) if accum == 1 else f"{r['batch'] // accum} x{accum}"


def options_text(r: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in r.get("compiler_options", {}).items())


def markdown_row(r: dict, note: str = "") -> str:
    notes = "; ".join(x for x in (note, f"cpu runtime: {r['cpu_runtime']}" if r.get("cpu_runtime") else "",
                                  f"XLA_FLAGS={r['xla_flags']}" if r["xla_flags"] else "",
                                  f"compiled with {options_text(r)}" if r.get("compiler_options") else "") if x)
    cells = [r["date"], r["commit"], r["device"], f"{r['jax']} / {r['flax']}", r["preset"],
             ", ".join(r["deltas"]) or "-", batch_text(r), str(r["seq"]), r["dtype"], backend_text(r),
             f"{r['tokens_per_s']:,.0f}", mfu_text(r), mem_text(r),
             f"{r['compile_s']:.1f}" + (" (cached)" if r.get("compile_cached") else ""),
             f"{1e3 * r['step_s']:.1f}", notes or "-"]
    return "| " + " | ".join(c.replace("|", "/") for c in cells) + " |"


def append_row(path: str | Path, r: dict, note: str = "") -> None:
    """Add a row at the end of the results table (the one under HEADER), wherever it sits in the file, so
    prose sections after it stay put; a missing file or table gets one."""
    path = Path(path)
    lines = path.read_text().splitlines() if path.exists() else ["# Benchmarks"]
    sep = "|---" * HEADER.count(" | ") + "|---|"
    starts = [i for i, line in enumerate(lines) if line.strip() == HEADER]
    if not starts:
        lines += ["", "## All rows", "", "Rows appended by `jaxchat bench` (src/jaxchat/bench.py).", "", HEADER, sep]
        end = len(lines)
    else:
        end = starts[-1] + 1
        while end < len(lines) and lines[end].startswith("|"):
            end += 1
    lines.insert(end, markdown_row(r, note))
    path.write_text("\n".join(lines) + "\n")


def cmd_bench(args) -> None:
    base, cfg = bench_config(args.preset, args.set, args.batch, args.seq, args.backend, args.dtype, args.accum)
    r = run_bench(args.preset, cfg, base, steps=args.steps, warmup=args.warmup, profile_dir=args.profile)
    print(format_report(r), flush=True)
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(json.dumps({**r, "note": args.note}) + "\n")
    if args.record:
        append_row(args.record, r, args.note)
        print(f"recorded in {args.record}")


def add_parsers(subparsers) -> None:
    """Register `bench` on the CLI's subparsers (cli.build_parser calls this)."""
    b = subparsers.add_parser("bench", help="time the training step of a preset (tokens/s, MFU, memory) on random tokens",
                              description=__doc__.split("\n\n")[0])
    b.add_argument("--preset", required=True, help="preset name (jaxchat presets)")
    b.add_argument("--batch", type=int, help="sequences per step (default: the preset's micro-batch)")
    b.add_argument("--accum", type=int, default=1,
                   help="micro-batches of --batch sequences per step, gradients accumulated before one optimizer "
                        "update (default 1; nanochat-d12's own step on one GPU is 8 x 32)")
    b.add_argument("--seq", type=int, help="sequence length (default: the preset's; windows follow it)")
    b.add_argument("--steps", type=int, default=10, help="timed steps, split into up to 3 windows (default 10)")
    b.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling (default 2)")
    b.add_argument("--backend", choices=list(ATTENTION_BACKENDS), help="attention backend (default: the preset's)")
    b.add_argument("--dtype", choices=["bfloat16", "float32"],
                   help="compute dtype (default: the preset's, auto: bf16 on GPU/TPU and bf16-capable CPUs)")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value (repeatable)")
    b.add_argument("--profile", metavar="DIR", help="also write a jax.profiler trace of 3 steps to DIR")
    b.add_argument("--record", metavar="FILE",
                   help="also append the result as one row to FILE's results table, e.g. BENCHMARKS.md "
                        "(default: print only, write nothing)")
    b.add_argument("--json", metavar="FILE", help="also append the full result as one JSON line to FILE")
    b.add_argument("--note", default="", help="free text for the row's notes column")
    b.set_defaults(fn=cmd_bench)

