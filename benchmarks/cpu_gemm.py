"""XLA:CPU's GEMMs in the forms a training step makes them: the forward x @ w, and the two backward dots as
autodiff writes them (dx = g @ w^T, dw = x^T @ g, the transpose folded into the dot) against cpu_dots.grads
(the transposed operand copied row-major first, a canonical dot), in fp32 and bf16 (bf16 operands, f32
accumulation), at cpu-bench's lm_head and MLP shapes.

    python benchmarks/cpu_gemm.py [--reps 10]

Each cell is the best of --reps calls of one jitted function (ms), the variants of a row timed back to back.
"""

from __future__ import annotations

import argparse
import time

from jaxchat import cpu_runtime

cpu_runtime.tune_cpu_runtime()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxchat.model import cpu_dots  # noqa: E402

SHAPES = {"lm_head": (4096, 256, 8192), "mlp c_fc": (4096, 256, 1024), "mlp c_proj": (4096, 1024, 256)}


def best_ms(fn, *args, reps: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    acc = jnp.float32
    print(f"{jax.devices()[0].device_kind} | jax {jax.__version__} | best of {args.reps} calls, ms")
    print("| shape (M, K, N) | dtype | x @ w | dx autodiff | dx canonical | dw autodiff | dw canonical |")
    print("|---|---|---|---|---|---|---|")
    for name, (M, K, N) in SHAPES.items():
        for dtype in (jnp.float32, jnp.bfloat16):
            x, w, g = (jnp.asarray(rng.standard_normal(s), dtype) for s in ((M, K), (K, N), (M, N)))
            cells = [
                best_ms(jax.jit(lambda x, w: jnp.matmul(x, w, preferred_element_type=acc)), x, w, reps=args.reps),
                best_ms(jax.jit(lambda g, w: jnp.matmul(g, w.T, preferred_element_type=acc)), g, w, reps=args.reps),
                best_ms(jax.jit(lambda x, w, g: cpu_dots.grads(x, w, g)[0]), x, w, g, reps=args.reps),
                best_ms(jax.jit(lambda x, g: jnp.matmul(x.T, g, preferred_element_type=acc)), x, g, reps=args.reps),
                best_ms(jax.jit(lambda x, w, g: cpu_dots.grads(x, w, g)[1]), x, w, g, reps=args.reps),
            ]
            print(f"| {name} ({M}, {K}, {N}) | {jnp.dtype(dtype).name} | " + " | ".join(f"{c:.2f}" for c in cells)
                  + " |", flush=True)


if __name__ == "__main__":
    main()
