"""Time the fused head (lm_head GEMM + loss, forward and backward) with the xla loss and with tunings of the
Pallas loss kernel (model/loss_kernel.py) at a preset's shapes, check every tuning against the xla head, then
optionally run `jaxchat bench` with the fastest correct tuning and, for a pair, with the xla loss.

    python benchmarks/loss_kernel_tuning.py --out DIR [--tokens 65536 --vocab 32768 --embd 768]
                                            [--budget SECONDS] [-- BENCH ARGS...]

DIR gets tuning.jsonl (one line per variant) and, with bench arguments, rows.md and results.jsonl. On a GPU only.
The sweep runs in a child process, so that the bench runs find the GPU's memory free (a first version swept in
this process, and both bench runs then failed to allocate).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxchat.model import loss_kernel as K  # noqa: E402
from jaxchat.model.head import head_nll  # noqa: E402

TUNINGS = [K.Tuning(1, None, 4), K.Tuning(1, None, 8), K.Tuning(1, None, 16), K.Tuning(1, None, 32),
           K.Tuning(1, 4096, 8), K.Tuning(1, 2048, 4), K.Tuning(2, 2048, 8), K.Tuning(4, 1024, 4),
           K.Tuning(8, 512, 4), K.Tuning(4, 2048, 8), K.Tuning(2, None, 32)]


def time_head(x, w, t, kernel: str, iters: int = 10):
    """(ms per forward + backward, outputs) of the head at cap 15 with a unit cotangent, after compiling."""

    @partial(jax.jit, static_argnums=2)
    def run(x, w, kernel):
        nll, vjp = jax.vjp(lambda x, w: head_nll(x, w, t, 15.0, 0, kernel), x, w)
        return (jnp.sum(nll), *vjp(jnp.ones_like(nll)))

    out = jax.block_until_ready(run(x, w, kernel))
    for _ in range(2):
        jax.block_until_ready(run(x, w, kernel))
    t0 = time.perf_counter()
    for _ in range(iters):
        out = run(x, w, kernel)
    jax.block_until_ready(out)
    return 1e3 * (time.perf_counter() - t0) / iters, out


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--embd", type=int, default=768)
    ap.add_argument("--budget", type=float, default=150, help="seconds for the tuning sweep")
    ap.add_argument("--sweep-only", action="store_true", help=argparse.SUPPRESS)  # the child process
    ap.add_argument("bench", nargs=argparse.REMAINDER, help="-- then `jaxchat bench` arguments")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.sweep_only:
        return sweep(args, out)
    child = [sys.executable, __file__, "--sweep-only", "--out", str(out), "--tokens", str(args.tokens),
             "--vocab", str(args.vocab), "--embd", str(args.embd), "--budget", str(args.budget)]
    subprocess.run(child, check=True)
    results = [json.loads(line) for line in (out / "tuning.jsonl").read_text().splitlines()]
    good = [r for r in results[1:] if r.get("correct")]
    if not args.bench or not good:
        return
    best = min(good, key=lambda r: r["ms"])
    print(f"fastest correct tuning: {best['variant']} {best['ms']:.2f} ms (xla {results[0]['ms']:.2f} ms)", flush=True)
    bench = [a for a in args.bench if a != "--"]
    record = ["--json", str(out / "results.jsonl"), "--record-to", str(out / "rows.md")]
    setup = f"import jaxchat.model.loss_kernel as K; K.TUNING = K.{best['variant']}; "
    runs = [(setup, bench + ["--set", "model.loss_kernel=pallas"], f"loss pallas {best['variant']}"), ("", bench, "loss xla")]
    for pre, bargs, note in runs:
        code = pre + "import runpy; runpy.run_module('jaxchat.bench', run_name='__main__', alter_sys=True)"
        print(f"=== {note}", flush=True)
        subprocess.run([sys.executable, "-c", code, *bargs, *record, "--note", note], check=False)


def sweep(args, out: Path):
    """Time the xla head and every tuning in TUNINGS (within the budget) and write out/tuning.jsonl."""
    kx, kw, kt = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (args.tokens, args.embd)).astype(jnp.bfloat16)
    w = (0.05 * jax.random.normal(kw, (args.embd, args.vocab))).astype(jnp.bfloat16)
    t = jax.random.randint(kt, (args.tokens,), 0, args.vocab)

    start = time.perf_counter()
    base_ms, ref = time_head(x, w, t, "xla")
    print(f"xla head: {base_ms:.2f} ms per forward + backward", flush=True)
    results = [{"variant": "xla", "ms": base_ms}]
    for tuning in TUNINGS:
        if time.perf_counter() - start > args.budget:
            print(f"skipped (budget): {tuning}")
            continue
        K.TUNING = tuning
        row = {"variant": str(tuning)}
        try:
            t0 = time.perf_counter()
            row["ms"], got = time_head(x, w, t, "pallas")
            row["compile_and_time_s"] = time.perf_counter() - t0
            row["nll_rel"], row["dx_rel"], row["dw_rel"] = (rel(a, b) for a, b in zip(got, ref))
            row["correct"] = row["nll_rel"] < 1e-5 and row["dx_rel"] < 1e-2 and row["dw_rel"] < 1e-2
        except Exception as e:  # a tuning Triton cannot compile is a result too
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        results.append(row)
        print(json.dumps(row), flush=True)
    (out / "tuning.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))


if __name__ == "__main__":
    main()
