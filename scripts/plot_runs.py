"""Plot training loss and validation bpb of several run directories into one PNG.

usage: python scripts/plot_runs.py OUT.png RUN_DIR[=LABEL] [RUN_DIR[=LABEL] ...]   (needs matplotlib: pip install '.[plot]')
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(run_dir: Path):
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    val = [(r["step"], r["val_bpb"]) for r in recs if "val_bpb" in r]
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    return train, val, summary


def main(argv):
    out, runs = Path(argv[0]), argv[1:]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ref = None
    for spec in runs:
        path, _, label = spec.partition("=")
        train, val, summary = load(Path(path))
        label = label or Path(path).name
        ax1.plot(*zip(*train), label=label, lw=1)
        ax2.plot(*zip(*val), marker="o", label=label)
        ref = ref or summary
    if ref:
        ax2.axhline(ref["gzip_bpb"], color="gray", ls="--", lw=1, label="gzip -9")
        ax2.axhline(ref["xz_bpb"], color="gray", ls=":", lw=1, label="xz -9e")
    ax1.set(xlabel="step", ylabel="train loss (nats/token)", title="training loss")
    ax2.set(xlabel="step", ylabel="val bits per byte", title="validation bpb")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
