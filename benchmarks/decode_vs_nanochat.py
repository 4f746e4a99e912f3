"""Generation speed on the same weights: nanochat's `Engine` (PyTorch, imported from a nanochat checkout the user
points to; none of its code is copied here) against jaxchat's compiled decode engine (src/jaxchat/chat/engine.py)
and `jaxchat sample`'s Sampler (src/jaxchat/sample.py, batch 1).

    pip install -e .[torch]          # torch==2.13.0 (the CPU build), plus nanochat's imports:
    pip install filelock rustbpe tiktoken psutil
    python benchmarks/decode_vs_nanochat.py --nanochat /path/to/nanochat [--layers 4 --width 256 --tokens 128]

The model is nanochat's GPT (GPTConfig from the flags), initialised by nanochat's own `init_weights` with
noise added to every tensor (so no row is degenerate); jaxchat gets the same tensors through
jaxchat.interop.nanochat, and the script checks first that both compute the same logits and the same greedy
continuation. Both run in float32 on CPU. Every row generates --tokens new tokens after the same --prompt-tokens
prompt; stop tokens are turned off on both sides (nanochat's Engine is given a tokenizer stand-in whose special
ids are never sampled; jaxchat's gets no stop ids), so every row does the same work. The decoders run in
alternation, --repeats rounds after a warm-up (compile) round, and the median per decoder is reported with the
ratio to nanochat. Prints markdown rows for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import numpy as np


class NoStopTokenizer:
    """What nanochat's Engine asks of a tokenizer, with every special id out of the vocabulary: no row ever
    stops or calls a tool, as jaxchat's engine with no stop ids."""

    def encode_special(self, text: str) -> int:
        return -1

    def get_bos_token_id(self) -> int:
        return -2

    def encode(self, text):
        raise AssertionError("no tool call can happen without its special tokens")

    decode = encode


def nanochat_model(checkout: Path, args):
    """(torch GPT, GPTConfig dict) built by nanochat's own code, weights = init_weights + noise."""
    sys.path.insert(0, str(checkout))
    import torch
    from nanochat.gpt import GPT, GPTConfig

    config = dict(sequence_len=args.context, vocab_size=args.vocab, n_layer=args.layers,
                  n_head=args.width // 128, n_kv_head=args.width // 128, n_embd=args.width,
                  window_pattern=args.window_pattern)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**config))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval(), config


def jaxchat_model(model, config: dict):
    """(fns, params) of jaxchat's GPT holding the torch model's tensors (interop/nanochat.py)."""
    from jaxchat.config import Config, DataConfig
    from jaxchat.interop.nanochat import config_from_nanochat, model_from_state_dict
    from jaxchat.model.gpt import param_dict
    from jaxchat.train import ModelFns

    mcfg = config_from_nanochat(config, compute_dtype="float32")
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    gpt = model_from_state_dict(state, mcfg)
    cfg = Config(model=mcfg, data=DataConfig(tokenizer_vocab=mcfg.vocab_size))
    return ModelFns(cfg), param_dict(gpt)


def check_same_model(model, fns, params, prompt) -> float:
    """Max |logit difference| of the two models on the prompt."""
    import torch

    with torch.no_grad():
        ref = model(torch.tensor([prompt])).float().numpy()
    ours = np.asarray(fns.module(params)(jax.numpy.asarray([prompt])))[..., :ref.shape[-1]]
    return float(np.abs(ref - ours).max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nanochat", required=True, type=Path, help="a nanochat checkout (holds nanochat/engine.py)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=256, help="n_embd (heads of 128)")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--window-pattern", default="L")
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per row")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, action="append", help="batch sizes (default 1 and 8)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch's intra-op threads (default 1: on a shared 2-core machine under load, torch's 2 "
                         "OpenMP threads spin against other jobs and decode ~80x slower, which would flatter jaxchat)")
    args = ap.parse_args()
    if not (args.nanochat / "nanochat" / "engine.py").is_file():
        sys.exit(f"--nanochat {args.nanochat}: no nanochat/engine.py there; point it at a nanochat checkout")
    try:
        import torch
    except ImportError:
        sys.exit("torch is not installed: pip install -e .[torch] (torch==2.13.0, the CPU build)")
    torch.set_num_threads(args.torch_threads)
    model, config = nanochat_model(args.nanochat, args)
    from nanochat.engine import Engine as NanoEngine  # (importable once nanochat_model put the checkout on the path)

    from jaxchat.chat.engine import Engine, Sampling
    from jaxchat.sample import Sampler

    fns, params = jaxchat_model(model, config)
    prompt = np.random.default_rng(0).integers(0, args.vocab, args.prompt_tokens).tolist()
    n = args.tokens
    diff = check_same_model(model, fns, params, prompt)
    nano, engine, sampler = NanoEngine(model, NoStopTokenizer()), Engine(fns, params), Sampler(fns)
    greedy_nano = [col[0] for col, _ in nano.generate(prompt, 1, max_tokens=16, temperature=0.0)]
    greedy_ours = engine.generate(prompt, 1, 16, Sampling(0.0), seed=0).tokens[0]
    if greedy_nano != list(greedy_ours):
        sys.exit(f"the two models differ: greedy {greedy_nano} vs {list(greedy_ours)} (max logit diff {diff:.2e})")

    def run_nano(b, temperature, top_k):
        def go():
            return sum(len(col) for col, _ in nano.generate(prompt, b, max_tokens=n, temperature=temperature,
                                                            top_k=top_k or None, seed=0))
        return go

    rows = []
    for label, temperature, top_k in (("greedy", 0.0, 0), ("T 0.8, top-k 50", 0.8, 50)):
        for b in args.batch or [1, 8]:
            decoders = {"nanochat Engine (PyTorch)": run_nano(b, temperature, top_k),
                        "jaxchat engine (one while_loop)":
                            lambda: b * len(engine.generate(prompt, b, n, Sampling(temperature, top_k),
                                                            seed=0).tokens[0])}
            if b == 1:
                decoders["`jaxchat sample` (Sampler)"] = lambda: len(sampler.generate(params, prompt, n, temperature,
                                                                                      top_k, seed=0))
            times = {k: [] for k in decoders}
            for r in range(args.repeats + 1):  # round 0 compiles (jax) and warms up (torch)
                for k, fn in decoders.items():
                    t0 = time.perf_counter()
                    made = fn()
                    dt = time.perf_counter() - t0
                    assert made == b * n, f"{k} generated {made} tokens, not {b * n}"
                    if r:
                        times[k].append(dt)
            base = b * n / statistics.median(times["nanochat Engine (PyTorch)"])
            for k, ts in times.items():
                speed = b * n / statistics.median(ts)
                rows.append((k, label, b, speed, speed / base))
    print(f"model: nanochat GPT n_layer {args.layers}, n_embd {args.width}, vocab {args.vocab}, window "
          f"{args.window_pattern}; prompt {args.prompt_tokens} tokens, {n} new tokens per row, no stop token; "
          f"same weights (max logit diff {diff:.1e}, greedy continuations equal); float32, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads), jax {jax.__version__}; median of {args.repeats} alternating rounds")
    print("| decoder | sampling | batch | generated tok/s | vs nanochat |")
    print("|---|---|---|---|---|")
    for decoder, label, b, speed, ratio in rows:
        print(f"| {decoder} | {label} | {b} | {speed:,.0f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
