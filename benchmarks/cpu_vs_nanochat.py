"""Training-step speed on the CPU, side by side: nanochat's GPT (PyTorch, imported from a nanochat checkout the
user points to; none of its code is copied here), eager and torch.compile'd, in fp32 and under bf16 autocast,
against jaxchat's compiled training step (the one `jaxchat train` and `jaxchat bench` run) in fp32 and bf16.

    pip install -e .[torch]          # torch==2.13.0 (the CPU build), plus nanochat's imports:
    pip install filelock rustbpe tiktoken psutil
    python benchmarks/cpu_vs_nanochat.py --nanochat /path/to/nanochat [--rounds 3 --steps 3]

The config is jaxchat's `cpu-bench` preset (4 layers, n_embd 256, 2 heads of 128, vocab 8192, seq 512, batch 8,
SSSL windows, AdamW lr 3e-3, betas 0.9/0.999, eps 1e-8, weight decay 0.01, global-norm clip 1.0); nanochat's
GPTConfig is built from it. The weights are nanochat's own `init_weights` with noise added to every tensor (so
no projection starts at zero and every path reaches the loss); jaxchat starts from the same tensors through
jaxchat.interop.nanochat. A step is the whole update on one fixed batch of uniform random tokens: forward with
the loss, backward, and the optimizer (torch: `torch.optim.AdamW` with the same hyperparameters, fused, after
`clip_grad_norm_`; jaxchat: its optax AdamW with its warmup schedule). torch.compile wraps the model as nanochat's
base_train does (`dynamic=False`); the optimizer runs eagerly. bf16: nanochat's forward under
`torch.autocast("cpu", torch.bfloat16)` (the backward outside it), jaxchat with `model.compute_dtype=bfloat16`;
parameters and optimizer state stay fp32 on both sides.

Before timing, the first step of every variant runs on the same starting weights and batch, and its loss is checked
against nanochat's fp32 loss (eager, or compiled with --no-eager; fp32 variants within 1e-3, bf16 within 5e-2): the
two frameworks compute the same model. Then --rounds rounds, each timing --steps consecutive steps of every variant
in turn (the order rotates from round to round, so no variant always runs right after the same other one); tokens/s
per variant is the median over rounds, and each ratio is also given as the median of its per-round ratios (steadier
when the machine's load drifts). Everything runs in one process, both frameworks on all cores; jaxchat's CPU
runtime settings (src/jaxchat/cpu_runtime.py: synchronous dispatch, glibc keeps freed memory) are applied at start
as `jaxchat bench` does, and so hold for torch too. The 1-minute load average is printed at each round: on a shared
machine compare ratios, not absolute numbers. Prints markdown rows for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

from jaxchat import cpu_runtime

cpu_runtime.tune_cpu_runtime()  # before JAX starts its CPU client, as cli.py does for `jaxchat bench`

import jax  # noqa: E402
import numpy as np  # noqa: E402

PRESET = "cpu-bench"
LOSS_TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2}  # |first-step loss - nanochat eager fp32's|


def nanochat_model(checkout: Path, mcfg, seed: int):
    """nanochat's GPT at jaxchat's model config, weights = nanochat's init_weights + noise (fp32, train mode)."""
    sys.path.insert(0, str(checkout))
    import torch
    from nanochat.gpt import GPT, GPTConfig

    gpt_config = dict(sequence_len=mcfg.sequence_len, vocab_size=mcfg.vocab_size, n_layer=mcfg.n_layer,
                      n_head=mcfg.n_head, n_kv_head=mcfg.n_kv_head, n_embd=mcfg.n_embd,
                      window_pattern=mcfg.window_pattern)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**gpt_config))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.float().train(), gpt_config


def torch_step(model, args, bf16: bool, compiled: bool):
    """One training step of a private copy of `model`: () -> loss (float)."""
    import torch

    model = copy.deepcopy(model)
    fwd = torch.compile(model, dynamic=False) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(args.b1, args.b2), eps=args.eps,
                            weight_decay=args.weight_decay, fused=True)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = fwd(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        return loss

    return step


def jaxchat_step(torch_model, dtype: str):
    """(step(state) -> (state, metrics), first state, cfg): jaxchat's train step at cpu-bench in `dtype`,
    starting from the torch model's tensors."""
    from jaxchat.bench import bench_config
    from jaxchat.interop.nanochat import model_from_state_dict
    from jaxchat.model.gpt import param_dict
    from jaxchat.run import Run
    from jaxchat.train import make_train_step, replicated, state_from_params

    _, cfg = bench_config(PRESET, [], dtype=dtype)
    run = Run.build(cfg)
    state = {k: v.detach().float().numpy() for k, v in torch_model.state_dict().items()}
    params = param_dict(model_from_state_dict(state, run.cfg.model))
    first = jax.device_put(state_from_params(params, run.optimizer), replicated(run.mesh))
    return make_train_step(run.fns, run.optimizer), first, run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nanochat", required=True, type=Path, help="a nanochat checkout (holds nanochat/gpt.py)")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (default 3); the median is reported")
    ap.add_argument("--steps", type=int, default=3, help="consecutive steps timed per variant per round (default 3)")
    ap.add_argument("--warmup", type=int, default=2,
                    help="untimed steps per variant before round 1, after compiling (default 2)")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16 (default both)")
    ap.add_argument("--no-eager", action="store_true", help="leave out nanochat's eager (uncompiled) variants")
    ap.add_argument("--torch-threads", type=int, default=0,
                    help="torch's intra-op threads (default 0: torch's own choice, one per core)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not (args.nanochat / "nanochat" / "gpt.py").is_file():
        sys.exit(f"--nanochat {args.nanochat}: no nanochat/gpt.py there; point it at a nanochat checkout")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or set(dtypes) - {"fp32", "bf16"}:
        sys.exit(f"--dtypes {args.dtypes!r}: give fp32, bf16 or fp32,bf16")
    if min(args.rounds, args.steps) < 1 or args.warmup < 0:
        sys.exit("--rounds and --steps must be >= 1, --warmup >= 0")
    try:
        import torch
    except ImportError:
        sys.exit("torch is not installed: pip install -e .[torch] (torch==2.13.0, the CPU build)")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    from jaxchat.bench import bench_config
    from jaxchat.environment import device_label, git_commit

    _, cfg = bench_config(PRESET, [])
    o, B, T = cfg.optim, cfg.train.batch_size, cfg.model.sequence_len
    args.lr, args.b1, args.b2, args.eps = o.lr, o.b1, o.b2, o.eps
    args.weight_decay, args.grad_clip = o.weight_decay, o.grad_clip
    model, gpt_config = nanochat_model(args.nanochat, cfg.model, args.seed)
    tokens = np.random.default_rng(args.seed + 1).integers(0, cfg.model.vocab_size, (B, T + 1))
    x_np, y_np = tokens[:, :-1].astype(np.int32), tokens[:, 1:].astype(np.int32)
    x_t, y_t = torch.from_numpy(x_np).long(), torch.from_numpy(y_np).long()

    # variant name -> run(n) -> loss of the last of n steps (each variant keeps its own weights and optimizer)
    variants, kinds = {}, {}
    for dt in dtypes:
        bf16 = dt == "bf16"
        for compiled in ([True] if args.no_eager else [False, True]):
            name = f"nanochat {'torch.compile' if compiled else 'eager'} {'bf16 autocast' if bf16 else 'fp32'}"
            step = torch_step(model, args, bf16, compiled)
            variants[name] = (lambda step: lambda n: [step(x_t, y_t) for _ in range(n)][-1].item())(step)
            kinds[name] = ("nanochat", compiled, dt)
        jstep, jstate, run = jaxchat_step(model, "bfloat16" if bf16 else "float32")
        from jaxchat.train import batch_sharding, shaped_batch

        batch = jax.device_put(shaped_batch(x_np, y_np, run.cfg.train.grad_accum), batch_sharding(run.mesh))
        holder = {"state": jstate}

        def run_jax(n, holder=holder, jstep=jstep, batch=batch):
            for _ in range(n):
                holder["state"], metrics = jstep(holder["state"], batch)
            return float(jax.block_until_ready(metrics)["loss"])

        name = f"jaxchat {dt}"
        variants[name], kinds[name] = run_jax, ("jaxchat", True, dt)

    # first step of each (compiles it): the same weights and batch give the same loss
    first, setup = {}, {}
    for name, fn in variants.items():
        t0 = time.perf_counter()
        first[name] = fn(1)
        setup[name] = time.perf_counter() - t0
        print(f"first step  {name:32s} loss {first[name]:.6f}  ({setup[name]:.1f} s incl. compile)", flush=True)
    ref_name = next(k for k in ("nanochat eager fp32", "nanochat torch.compile fp32", *first) if k in first)
    ref = first[ref_name]
    bad = [f"{k}: {v:.6f} vs {ref:.6f}" for k, v in first.items() if abs(v - ref) > LOSS_TOLERANCE[kinds[k][2]]]
    if bad or not (8.0 < ref < 10.5):  # ln(8192) = 9.01: a fresh model on random tokens sits near it
        sys.exit("first-step losses disagree (the two models differ): " + "; ".join(bad or [f"reference {ref}"]))
    for fn in variants.values():
        if args.warmup:
            fn(args.warmup)

    names = list(variants)
    times = {k: [] for k in names}
    loads = [os.getloadavg()[0]]
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            variants[name](args.steps)
            times[name].append((time.perf_counter() - t0) / args.steps)
        loads.append(os.getloadavg()[0])
        print(f"round {r + 1}: " + ", ".join(f"{k} {B * T / times[k][-1]:,.0f}" for k in names)
              + f" tok/s; load {loads[-1]:.2f}", flush=True)

    tps = {k: B * T / statistics.median(v) for k, v in times.items()}
    span = {k: (B * T / max(v), B * T / min(v)) for k, v in times.items()}
    print()
    print(f"config: {PRESET} (nanochat GPTConfig {gpt_config}), batch {B} x {T}, AdamW lr {args.lr}; "
          f"first-step losses agree ({ref_name} {ref:.6f}; "
          + ", ".join(f"{k} {v - ref:+.1e}" for k, v in first.items()) + ")")
    print(f"{device_label()} | torch {torch.__version__} ({torch.get_num_threads()} threads) | jax {jax.__version__} "
          f"| jaxchat {git_commit()} | cpu runtime: {cpu_runtime.current()} | median of {args.rounds} alternating "
          f"rounds of {args.steps} steps | 1-min load {min(loads):.2f}-{max(loads):.2f}")
    print("| variant | tok/s (median) | range over rounds | step ms | vs nanochat compiled, same dtype: ratio of "
          "medians (median of per-round ratios, range) | vs nanochat eager, same dtype |")
    print("|---|---|---|---|---|---|")
    for k in names:
        _, _, dt = kinds[k]
        suffix = "bf16 autocast" if dt == "bf16" else "fp32"

        def rel(base: str) -> str:
            if base not in tps:
                return "-"
            # rounds drift with the machine's load: the ratio within each round is the steadier figure
            per_round = [b / t for t, b in zip(times[k], times[base])]
            return (f"{tps[k] / tps[base]:.2f}x ({statistics.median(per_round):.2f}x, "
                    f"{min(per_round):.2f}-{max(per_round):.2f})")

        print(f"| {k} | {tps[k]:,.0f} | {span[k][0]:,.0f}-{span[k][1]:,.0f} | {1e3 * B * T / tps[k]:.0f} | "
              f"{rel(f'nanochat torch.compile {suffix}')} | {rel(f'nanochat eager {suffix}')} |")


if __name__ == "__main__":
    main()
