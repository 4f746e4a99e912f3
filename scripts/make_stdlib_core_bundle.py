"""Write a small CORE-format eval bundle made from the validation split of the embedded stdlib corpus, for a
smoke test of `jaxchat eval --core` on a model trained here (nanochat's real bundle is a download).

    python scripts/make_stdlib_core_bundle.py OUT [--n 200] [--seed 0]
    jaxchat eval --run runs/tiny --core OUT

Three tasks in nanochat's bundle format (core.yaml, eval_meta_data.csv, eval_data/*.jsonl), each over lines of
stdlib source the `tiny` run never trained on (the validation files):
    stdlib_mc       multiple_choice, 4 choices: a line's first words; the true rest of the line among the rests
                    of three other lines (random baseline 25%)
    stdlib_schema   schema, 2 options: which of two lines (the true previous line, another) precedes a line
                    (random baseline 50%)
    stdlib_lm       language_modeling: a line's first words; its next word, greedily (baseline 0%)
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

import yaml

from jaxchat.data.corpus import split_train_val, stdlib_documents


def code_lines(seed: int) -> list[tuple[str, str]]:
    """(previous line, line) pairs of stripped code lines of 30-70 characters with at least four words."""
    _, val = split_train_val(stdlib_documents())
    pairs = []
    for name, text in val:
        if not name.endswith(".py"):
            continue
        lines = [ln.strip() for ln in text.splitlines()]
        for prev, line in zip(lines, lines[1:]):
            if 30 <= len(line) <= 70 and len(line.split()) >= 4 and len(prev) >= 10 and not line.startswith("#") \
                    and "0x" not in line + prev:  # (not the codecs' mapping tables)
                pairs.append((prev, line))
    random.Random(seed).shuffle(pairs)
    return pairs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--n", type=int, default=200, help="examples per task")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.out.exists():
        raise SystemExit(f"{args.out} exists: choose a new directory")
    rng = random.Random(args.seed)
    pairs = code_lines(args.seed)
    if len(pairs) < 4 * args.n:
        raise SystemExit(f"only {len(pairs)} usable lines for --n {args.n}")
    mc, schema, lm = [], [], []
    for i in range(args.n):
        prev, line = pairs[i]
        words = line.split()
        k = rng.randint(1, len(words) - 2)
        others = [pairs[args.n + 3 * i + j][1].split() for j in range(3)]
        choices = [" ".join(words[k:])] + [" ".join(o[min(k, len(o) - 1):]) for o in others]
        order = list(range(4))
        rng.shuffle(order)
        mc.append({"query": " ".join(words[:k]), "choices": [choices[j] for j in order], "gold": order.index(0)})
        other_prev = pairs[2 * args.n + i][0]
        gold = rng.randint(0, 1)
        schema.append({"context_options": [prev, other_prev] if gold == 0 else [other_prev, prev],
                       "continuation": line, "gold": gold})
        lm.append({"context": " ".join(words[:k]), "continuation": words[k]})
    (args.out / "eval_data").mkdir(parents=True)
    tasks = []
    for label, kind, rows, baseline, delim in (("stdlib_mc", "multiple_choice", mc, 25.0, " "),
                                               ("stdlib_schema", "schema", schema, 50.0, "\n"),
                                               ("stdlib_lm", "language_modeling", lm, 0.0, " ")):
        (args.out / "eval_data" / f"{label}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        tasks.append({"label": label, "icl_task_type": kind, "dataset_uri": f"{label}.jsonl", "num_fewshot": [0],
                      "continuation_delimiter": delim, "baseline": baseline})
    with open(args.out / "eval_meta_data.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Eval Task", "Random baseline"])
        for t in tasks:
            w.writerow([t["label"], t.pop("baseline")])
    (args.out / "core.yaml").write_text(yaml.safe_dump({"icl_tasks": tasks}, sort_keys=False))
    print(f"wrote {args.out}: 3 tasks x {args.n} examples")


if __name__ == "__main__":
    main()
