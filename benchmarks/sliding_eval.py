"""Cost of the sliding-window eval (src/jaxchat/golf/sliding.py) against a plain eval of the same tokens.

    python benchmarks/sliding_eval.py [--preset golf-pr334] [--set KEY=VALUE ...] [--tokens 8192]
                                      [--context 256] [--stride 64 ...] [--batch 8] [--repeats 3]

Both score the same --tokens targets of one random token stream with the same compiled eval step (a batch of
--batch windows of --context tokens): the plain eval as non-overlapping windows (stride = context), the sliding
one at each --stride. Each is run once to compile, then the median of --repeats timed runs. The ideal ratio is
context / stride (the number of windows grows by that factor; every window costs the same). Prints markdown rows
for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time

import jax
import numpy as np

from jaxchat.evaluate import make_eval_step
from jaxchat.golf.sliding import sliding_eval
from jaxchat.overrides import apply_overrides
from jaxchat.presets import get_preset
from jaxchat.train import ModelFns


def timed(fn, repeats: int) -> tuple[float, dict]:
    out = fn()  # compile (the first call of this shape) and warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="golf-pr334")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--stride", type=int, action="append")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    strides = args.stride or [64]
    cfg = apply_overrides(get_preset(args.preset), [f"model.sequence_len={args.context}"] + args.set)
    fns = ModelFns(cfg)
    params = fns.init_params(0)
    stream = np.random.default_rng(0).integers(0, cfg.model.vocab_size, args.tokens + 1).astype(np.int32)
    step = make_eval_step(fns, np.ones(cfg.model.padded_vocab_size, np.int32))
    base_s, base = timed(lambda: sliding_eval(step, params, stream, args.context, args.context, args.batch),
                         args.repeats)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    device = jax.devices()[0].device_kind if jax.default_backend() != "cpu" else f"CPU ({platform.processor() or 'x86'})"
    print("| device | model | tokens | context | stride | windows | eval s | ratio vs plain | ideal | commit |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {device} | {args.preset} | {args.tokens:,} | {args.context} | {args.context} (plain) | "
          f"{base['windows']:,} | {base_s:.3f} | 1.00 | 1 | {commit} |")
    for stride in strides:
        s, out = timed(lambda: sliding_eval(step, params, stream, args.context, stride, args.batch), args.repeats)
        print(f"| {device} | {args.preset} | {args.tokens:,} | {args.context} | {stride} | {out['windows']:,} | "
              f"{s:.3f} | {s / base_s:.2f} | {args.context / stride:.2f} | {commit} |")
    print(f"\njax {jax.__version__}, backend {jax.default_backend()}; plain loss {base['val_loss']:.4f}")


if __name__ == "__main__":
    main()
