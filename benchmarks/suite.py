"""Run a named plan of `jaxchat bench` measurements, one fresh process each (so every peak-memory reading is
that run's own), inside a time budget; collect JSON lines, BENCHMARKS.md rows and logs in one folder.

    python benchmarks/suite.py PLAN --out DIR [--budget SECONDS] [--only SUBSTRING] [--set KEY=VALUE ...]

Plans are below (`PLANS`); each entry is (note, bench arguments); the runs inherit the environment (e.g.
XLA_FLAGS). A run that fails (out of memory, unsupported shape) is recorded as a failure with the tail of its
output, and the suite goes on. Rows land in DIR/rows.md (copy the ones worth keeping into BENCHMARKS.md), full
results in DIR/results.jsonl, output in DIR/suite.log.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# each d12 preset's own step on one GPU (the headline rows of BENCHMARKS.md): nanochat-d12's batch is 8 accumulated
# micro-batches of 32 x 2048, the seed cards' 4 x 64 x 1024
D12_STEP = ["--preset", "nanochat-d12", "--seq", "2048", "--dtype", "bfloat16", "--batch", "32", "--accum", "8",
            "--backend", "cudnn", "--steps", "6"]
GELU_STEP = ["--preset", "d12-gelu-chinchilla", "--seq", "1024", "--dtype", "bfloat16", "--batch", "64", "--accum",
             "4", "--backend", "cudnn", "--steps", "6"]
YAT_STEP = ["--preset", "d12-yatnmn-softplus-chinchilla", *GELU_STEP[2:]]  # the seed-card recipe, its MLP
SWIGLU_STEP = GELU_STEP + ["--set", "model.mlp=swiglu"]

MICRO = ["--preset", "tiny", "--set", "model.n_layer=2", "--set", "model.n_embd=64", "--set", "model.n_kv_head=1",
         "--set", "model.n_head=1", "--set", "model.vocab_size=512", "--set", "data.tokenizer_vocab=512",
         "--seq", "64", "--batch", "4", "--steps", "3", "--warmup", "1"]

PLANS: dict[str, list[tuple[str, list[str]]]] = {
    # a smoke test of the suite itself (seconds on a CPU), one run profiled
    "micro": [("micro smoke test", MICRO), ("micro smoke test, profiled", MICRO + ["--profile", "/tmp/jaxchat-prof"])],
    # the shared CPU benchmark config (4 layers, 256 wide, vocab 8192, seq 512, batch 8, fp32)
    "cpu": [("shared CPU config", ["--preset", "cpu-bench", "--batch", "8", "--seq", "512", "--dtype", "float32",
                                   "--steps", "6", "--warmup", "1"])],
    # d12 throughput per MLP on one NVIDIA GPU (about 40 s a run on an H100): relu2 (nanochat-d12, Muon), gelu,
    # yatnmn-softplus and swiglu (the seed-card recipe, AdamW)
    "d12-gpu": [
        ("relu2 d12 32 x8", D12_STEP),
        ("gelu d12 64 x4", GELU_STEP),
        ("yatnmn-softplus d12 64 x4", YAT_STEP),
        ("swiglu d12 64 x4", SWIGLU_STEP),
    ],
}


def run_one(note: str, args: list[str], out: Path, timeout: float, log) -> dict:
    cmd = [sys.executable, "-m", "jaxchat.cli", "bench", *args, "--json", str(out / "results.jsonl"),
           "--record", str(out / "rows.md"), "--note", note]
    log(f"\n=== {note}: {' '.join(args)}")
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTHONUNBUFFERED": "1", "JAXCHAT_COMPILE_CACHE": "off"}  # cold compiles
    try:
        p = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        rc, text = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        partial = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc, text = -9, partial + f"\ntimed out after {timeout:.0f} s"
    log(text.rstrip())
    log(f"--- rc {rc}, {time.perf_counter() - t0:.0f} s")
    if rc == 0 and "--profile" in args:
        prof = args[args.index("--profile") + 1]
        s = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "trace_summary.py"), prof, "--ops", "60"],
                           capture_output=True, text=True)
        hlo = Path(prof) / "step.hlo.txt"  # the optimized HLO the trace's ops are read against, kept beside
        if hlo.exists():
            with open(hlo, "rb") as src, gzip.open(out / "step.hlo.txt.gz", "wb") as dst:
                shutil.copyfileobj(src, dst)
        (out / "trace_summary.txt").write_text(f"{note}\n{s.stdout}{s.stderr}")
        log(s.stdout + s.stderr)
    if rc != 0:
        tail = "\n".join(text.strip().splitlines()[-6:])
        with open(out / "results.jsonl", "a") as fh:
            fh.write(json.dumps({"note": note, "args": args, "failed": True, "rc": rc,
                                 "error": tail}) + "\n")
    return {"note": note, "rc": rc}


def table(out: Path) -> str:
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()] \
        if (out / "results.jsonl").exists() else []
    lines = [f"{'note':<48}{'tok/s':>12}{'MFU':>8}{'step ms':>9}{'peak GiB':>10}{'compile s':>10}"]
    for r in rows:
        if r.get("failed"):
            lines.append(f"{r['note'][:47]:<48}  FAILED rc={r['rc']}: {r['error'].splitlines()[-1][:80]}")
            continue
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        peak = r["peak_mem_bytes"] or r["xla_mem_estimate_bytes"] or 0
        lines.append(f"{r['note'][:47]:<48}{r['tokens_per_s']:>12,.0f}{mfu:>8}{1e3 * r['step_s']:>9.1f}"
                     f"{peak / 2**30:>10.2f}{r['compile_s']:>10.1f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("plan", choices=sorted(PLANS))
    p.add_argument("--out", required=True)
    p.add_argument("--budget", type=float, default=540, help="seconds; no run starts after this")
    p.add_argument("--timeout", type=float, default=150, help="seconds per run")
    p.add_argument("--only", default="", help="run only entries whose note contains this")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override added to every run (repeatable), noted in each row")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "suite.log", "a")

    def log(text):
        print(text, flush=True)
        logf.write(text + "\n")
        logf.flush()

    t0 = time.perf_counter()
    for note, args in PLANS[a.plan]:
        if a.only and a.only not in note:
            continue
        left = a.budget - (time.perf_counter() - t0)
        if left < 30:
            log(f"=== skipped (budget): {note}")
            continue
        extra = [x for kv in a.set for x in ("--set", kv)]
        run_one(note + "".join(f", {kv}" for kv in a.set), args + extra, out, min(a.timeout, left), log)
    log("\n" + table(out))


if __name__ == "__main__":
    main()
