"""Generation speed: the compiled decode engine (src/jaxchat/chat/engine.py) against `jaxchat sample`'s
Sampler (src/jaxchat/sample.py: one jitted step per token, back to Python after each), same model, same prompt.

    python benchmarks/decode_speed.py [--preset tiny] [--set KEY=VALUE ...] [--run DIR] [--tokens 192]

The model is the preset's with its init weights plus noise (decode speed does not depend on the weights), or a
run's checkpoint with --run. Every row generates --tokens new tokens after a --prompt-token prompt with no stop
token, so every row does the same work per sequence; tok/s counts generated tokens over all rows. Each
configuration runs once to compile, then the median of --repeats timed runs. Prints markdown rows for
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import numpy as np

from jaxchat.chat.engine import Engine, Sampling
from jaxchat.overrides import apply_overrides
from jaxchat.presets import get_preset
from jaxchat.sample import Sampler
from jaxchat.train import ModelFns


def model(args):
    """(name, fns, params) of the benchmarked model."""
    if args.run:
        from jaxchat.run import load_run
        cfg, fns, params, _, step = load_run(args.run)
        return f"{args.run} step {step}", fns, params
    cfg = apply_overrides(get_preset(args.preset), args.set)
    fns = ModelFns(cfg)
    leaves, tree = jax.tree.flatten(fns.init_params(0))
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    noisy = [p + 0.02 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
    return args.preset + "".join(f" {s}" for s in args.set), fns, jax.tree.unflatten(tree, noisy)


def timed(fn, repeats: int) -> tuple[float, float]:
    """(compile-and-first-run seconds, median seconds of the timed runs)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return first, statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--run", help="benchmark a run's checkpoint instead of a preset")
    ap.add_argument("--tokens", type=int, default=192, help="new tokens per row")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, action="append", help="engine batch sizes (default 1 and 8)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    name, fns, params = model(args)
    vocab = fns.cfg.model.vocab_size
    prompt = np.random.default_rng(0).integers(0, vocab, args.prompt_tokens).tolist()
    n = args.tokens
    sampler, engine = Sampler(fns), Engine(fns, params)
    rows = []
    for label, temperature, top_k in (("greedy", 0.0, 0), ("T 0.8, top-k 50", 0.8, 50)):
        first, t = timed(lambda: sampler.generate(params, prompt, n, temperature, top_k, seed=0), args.repeats)
        rows.append(("`jaxchat sample` (Sampler)", label, 1, n / t, first))
        for b in args.batch or [1, 8]:
            run = lambda: engine.generate(prompt, b, n, Sampling(temperature, top_k), seed=0)
            first, t = timed(run, args.repeats)
            rows.append(("engine (one while_loop)", label, b, b * n / t, first))
    print(f"model: {name}; prompt {args.prompt_tokens} tokens, {n} new tokens per row, no stop token; "
          f"{jax.devices()[0].device_kind}, {platform.processor() or platform.machine()}, jax {jax.__version__}")
    print("| decoder | sampling | batch | generated tok/s | first call s (compile) |")
    print("|---|---|---|---|---|")
    for decoder, label, b, speed, first in rows:
        print(f"| {decoder} | {label} | {b} | {speed:,.0f} | {first:.1f} |")


if __name__ == "__main__":
    main()
