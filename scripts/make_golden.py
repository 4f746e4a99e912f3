"""Regenerate the golden loss files in tests/golden/ (the only way they should change).

    python scripts/make_golden.py            # every golden file
    python scripts/make_golden.py tiny-micro-20

Each file holds the command that produced it (preset + --set overrides, which tests reuse), the per-step losses
and gradient norms of an uninterrupted run, and the environment they are exact for (jax/jaxlib versions,
backend, CPU architecture, and the fingerprints of the corpus and tokenizer). Regenerate only when a change is
meant to alter the numerics (and say so in the commit); a golden test failing otherwise is a regression.

- tiny-micro-20: the `tiny` preset shrunk to micro shapes, 20 steps with grad_accum 2, saves, evals and
  retention; fast enough for the fast suite, and also the reference run of tests/test_resume.py.
- tiny-20: the `tiny` preset itself, 20 steps (slow on a CPU: the test is marked slow).

Both pin the optimizer they were made with (ADAMW: `tiny`'s recipe until session 11, AdamW lr 0.01, warmup 20),
so that retuning `tiny`'s recipe does not move the goldens: they check the model and the loop, not the recipe.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN_DIR = ROOT / "tests" / "golden"

MICRO = ["model.n_layer=2", "model.n_embd=64", "model.n_head=1", "model.n_kv_head=1", "model.sequence_len=64",
         "model.vocab_size=512", "data.tokenizer_vocab=512", "data.max_train_chars=300000", "train.batch_size=4",
         "train.eval_tokens=512", "train.sample_tokens=4", "train.log_every=1"]

ADAMW = ["optim.optimizer=adamw", "optim.groups=", "optim.lr=0.01", "optim.warmup_steps=20",
         "optim.weight_decay=0.01"]

GOLDEN = {
    "tiny-micro-20": {"preset": "tiny", "set": MICRO + ADAMW + [
        "train.num_steps=20", "train.grad_accum=2", "train.save_every=4", "train.eval_every=8",
        "train.keep_last=2", "train.keep_every=8"]},
    "tiny-20": {"preset": "tiny", "set": ADAMW + ["train.num_steps=20", "train.eval_every=0",
                                                  "train.sample_tokens=4", "train.log_every=1"]},
}


def environment(run_dir: Path) -> dict:
    import jax
    import jaxlib

    from jaxchat.environment import cpu_vector_isa

    data = json.loads((run_dir / "data.json").read_text())
    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "backend": jax.default_backend(),
            "cpu_isa": cpu_vector_isa(),  # XLA:CPU code (and so float rounding) depends on the vector ISA
            "machine": platform.machine(), "python": sys.version.split()[0],
            "corpus_fingerprint": data["corpus_fingerprint"], "tokenizer_fingerprint": data["tokenizer_fingerprint"]}


def run(name: str, run_dir: Path) -> dict:
    from jaxchat.cli import main

    spec = GOLDEN[name]
    args = ["train", "--preset", spec["preset"], "--run-dir", str(run_dir), "--force"]
    for s in spec["set"]:
        args += ["--set", s]
    if main(args) != 0:
        raise SystemExit(f"{name}: training failed")
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    return {"name": name, "preset": spec["preset"], "set": spec["set"],
            "losses": [r["loss"] for r in steps], "grad_norms": [r["grad_norm"] for r in steps],
            "env": environment(run_dir),
            "how": "regenerate with `python scripts/make_golden.py " + name + "`, only for intended numeric changes"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("names", nargs="*", help=f"golden files among {', '.join(GOLDEN)} (default: all)")
    args = p.parse_args(argv)
    unknown = set(args.names) - set(GOLDEN)
    if unknown:
        p.error(f"unknown golden file(s) {sorted(unknown)}: choose among {', '.join(GOLDEN)}")
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    for name in args.names or list(GOLDEN):
        with tempfile.TemporaryDirectory() as tmp:
            out = run(name, Path(tmp) / name)
        path = GOLDEN_DIR / f"{name}.json"
        path.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {path}: {len(out['losses'])} losses, first {out['losses'][0]:.6f}, last {out['losses'][-1]:.6f}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("JAXCHAT_CPU_BF16", "0")  # fp32 on every CPU, as the tests that replay them (conftest.py)
    sys.exit(main())
