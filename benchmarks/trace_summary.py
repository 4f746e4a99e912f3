"""Device time per named scope (embed, attention, mlp, lm_head, loss, optimizer; forward / backward) from a
`jaxchat bench --profile DIR` trace.

    python benchmarks/trace_summary.py DIR [--steps 3] [--top 25] [--ops 40]

Reads the perfetto JSON trace that jax.profiler wrote under DIR, keeps the events on device (GPU/TPU) planes
(on a CPU run: XLA:CPU's op events of the train step, host events that carry their `hlo_op`),
and attributes each kernel to a scope through the JAX name stack: either carried by the event itself (an arg
holding "jit(...)/...") or looked up from the event's `hlo_op` in DIR/step.hlo.txt (the optimized HLO that
bench writes beside the trace: every instruction's `metadata={op_name=...}`). Backward kernels are those whose
name stack contains `transpose(`. Kernels of the same HLO op launched from inside a CUDA graph may carry no
`hlo_op`; they are reported as "unattributed" (profile with XLA_FLAGS=--xla_gpu_enable_command_buffer= for a
fully attributed trace).

Besides the scopes and the top kernels by name (one name can serve many HLO ops: XLA reuses a kernel for
identical fusions), it lists the top HLO ops with their result shapes from step.hlo.txt, and the memsets grouped
by the HLO op they belong to (on a GPU, XLA zeroes the outputs of atomic reductions and scatters and the
workspaces of some custom calls before they run: which ones, and at what cost, is what a step's memsets say).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys

SCOPES = ("embed", "attention", "mlp", "lm_head", "loss", "optimizer")
SCOPE_RE = re.compile(r"(?<![A-Za-z0-9_])(" + "|".join(SCOPES) + r")(?![A-Za-z0-9_])")
HLO_RE = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?metadata=\{[^}]*op_name="([^"]*)"')
SHAPE_RE = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+) = (.*?) [a-z][\w\-]*\(')


def load_trace(root: str) -> list[dict]:
    files = sorted(glob.glob(os.path.join(root, "**", "*.trace.json.gz"), recursive=True)) or \
        sorted(glob.glob(os.path.join(root, "**", "perfetto_trace.json.gz"), recursive=True))
    if not files:
        sys.exit(f"no *.trace.json.gz under {root}: run `jaxchat bench --profile {root}` first")
    data = json.load(gzip.open(files[-1]))
    return data["traceEvents"] if isinstance(data, dict) else data


def load_hlo(root: str) -> tuple[dict[str, str], dict[str, str]]:
    """From the optimized HLO beside the trace: {instruction: JAX name stack}, {instruction: result shape}."""
    names, shapes = {}, {}
    for path in glob.glob(os.path.join(root, "**", "*.hlo.txt"), recursive=True):
        with open(path) as fh:
            for line in fh:
                m = HLO_RE.match(line)
                if m:
                    names.setdefault(m.group(1), m.group(2))
                m = SHAPE_RE.match(line)
                if m:
                    shapes.setdefault(m.group(1), re.sub(r"\{[^{}]*\}", "", m.group(2)))
    return names, shapes


def spellings(op: str) -> tuple[str, ...]:
    """The ways a trace event may spell an HLO instruction's name in step.hlo.txt."""
    return op, op.replace("_", "-"), op.split(":")[0]


def hlo_op(ev: dict, known: dict[str, str]) -> str:
    """The HLO instruction an event ran for, spelled as in step.hlo.txt where it can be found there."""
    op = (ev.get("args") or {}).get("hlo_op")
    if not isinstance(op, str):
        return ""
    return next((c for c in spellings(op) if c in known), op)


def name_stack(ev: dict, hlo: dict[str, str]) -> str:
    """The JAX name stack of a kernel: its HLO op's metadata, else the longest "jit(...)" string it carries
    (on GPU `args.name` holds only the enclosing scope range, e.g. jit(step)/while/body)."""
    args = ev.get("args") or {}
    for key in ("hlo_op", "long_name", "tf_op"):
        op = args.get(key)
        if isinstance(op, str):
            for cand in spellings(op):
                if cand in hlo:
                    return hlo[cand]
    stacks = [v for v in args.values() if isinstance(v, str) and "jit(" in v]
    return max(stacks, key=len) if stacks else ""


def summarise(root: str, steps: int, top: int, ops: int = 40) -> str:
    events = load_trace(root)
    hlo, shapes = load_hlo(root)
    procs = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    dev_pids = {pid for pid, name in procs.items() if re.search(r"/device:(GPU|TPU)", name)}
    kernels = [e for e in events if e.get("ph") == "X" and e.get("pid") in dev_pids and e.get("dur", 0) > 0]
    what = "device events"
    if not kernels:  # a CPU run: XLA:CPU's thunks, each a host event labelled with its hlo_op
        kernels = [e for e in events if e.get("ph") == "X" and e.get("dur", 0) > 0
                   and (e.get("args") or {}).get("hlo_module", "").startswith("jit_step")
                   and (e.get("args") or {}).get("hlo_op")]
        what = "CPU op events (XLA:CPU, on several threads)"
    if not kernels:
        return f"no device events and no labelled CPU op events in the trace (processes: {sorted(procs.values())})"
    # only the compute stream(s): drop memcpy and host-side rows by keeping events with an hlo_op or kernel args
    by_scope = collections.defaultdict(float)
    by_kernel = collections.defaultdict(lambda: [0.0, 0, ""])
    by_op = collections.defaultdict(lambda: [0.0, 0, ""])
    memsets = collections.defaultdict(lambda: [0.0, 0, ""])
    arg_keys = collections.Counter()
    t0, t1, busy = min(e["ts"] for e in kernels), max(e["ts"] + e["dur"] for e in kernels), 0.0
    for e in kernels:
        arg_keys.update((e.get("args") or {}).keys())
        stack = name_stack(e, hlo)
        m = SCOPE_RE.search(stack)
        scope = (m.group(1) if m else ("other" if stack else "unattributed"))
        direction = "bwd" if "transpose(" in stack else "fwd"
        if scope == "optimizer":
            direction = "upd"
        by_scope[(scope, direction)] += e["dur"]
        busy += e["dur"]
        k = by_kernel[e.get("name", "?")[:90]]
        k[0] += e["dur"]
        k[1] += 1
        k[2] = k[2] or f"{scope}/{direction}"
        op = hlo_op(e, hlo) or "(no hlo_op)"
        for table in (by_op, memsets) if e.get("name", "").startswith("Memset") else (by_op,):
            row = table[op]
            row[0] += e["dur"]
            row[1] += 1
            row[2] = row[2] or f"{scope}/{direction}"
    ms = lambda us: us / 1e3 / steps
    lines = [f"trace {root}: {len(kernels)} {what} over {steps} steps; wall (first..last kernel) "
             f"{ms(t1 - t0):.1f} ms/step, kernel time {ms(busy):.1f} ms/step "
             f"({100 * busy / max(t1 - t0, 1e-9):.0f}% busy; >100% means overlapping streams)",
             f"{'scope':<14}{'fwd ms':>9}{'bwd ms':>9}{'upd ms':>9}{'total':>9}{'share':>8}"]
    for scope in SCOPES + ("other", "unattributed"):
        vals = [by_scope.get((scope, d), 0.0) for d in ("fwd", "bwd", "upd")]
        if sum(vals):
            lines.append(f"{scope:<14}" + "".join(f"{ms(v):>9.2f}" for v in vals)
                         + f"{ms(sum(vals)):>9.2f}{100 * sum(vals) / busy:>7.1f}%")
    lines.append(f"top {top} kernels (ms/step, launches/step, first scope seen):")
    for name, (dur, n, sc) in sorted(by_kernel.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"  {ms(dur):8.2f}  {n / steps:6.1f}  {sc:<16} {name}")
    for title, table, n in ((f"top {ops} HLO ops", by_op, ops), ("memsets by HLO op", memsets, ops)):
        total = sum(v[0] for v in table.values())
        lines.append(f"{title} (ms/step, launches/step, scope, op, result shape); all: {ms(total):.2f} ms/step, "
                     f"{sum(v[1] for v in table.values()) / steps:.1f} launches/step")
        for op, (dur, k, sc) in sorted(table.items(), key=lambda kv: -kv[1][0])[:n]:
            lines.append(f"  {ms(dur):8.2f}  {k / steps:6.1f}  {sc:<16} {op[:60]:<60} {shapes.get(op, '')[:70]}")
    lines.append("event arg keys seen: " + ", ".join(f"{k} ({n})" for k, n in arg_keys.most_common(12)))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dir")
    p.add_argument("--steps", type=int, default=3, help="steps in the trace (bench --profile traces 3)")
    p.add_argument("--top", type=int, default=25, help="kernels by name")
    p.add_argument("--ops", type=int, default=40, help="HLO ops (and memsets) by time")
    a = p.parse_args()
    print(summarise(a.dir, a.steps, a.top, a.ops))


if __name__ == "__main__":
    main()
