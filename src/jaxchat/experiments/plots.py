"""The report's plots (PNG, matplotlib: `pip install 'jaxchat[plot]'`):

- loss.png: the smooth train loss (results.smooth_losses) against steps, tokens and training FLOPs, one line per
  group: the mean over its seeds, with a band from the lowest to the highest seed;
- val_bpb.png: validation bits per byte at each evaluation, the same way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxchat.config import ConfigError
from jaxchat.experiments.results import smooth_losses


def _pyplot():
    try:
        import matplotlib  # (optional: the `plot` extra)
    except ImportError:
        raise ConfigError("plots need the optional package matplotlib: pip install 'jaxchat[plot]', or pass "
                          "--no-plots") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    return plt


def _by_group(runs: list[dict]) -> dict[str, list[dict]]:
    groups = {}
    for r in sorted(runs, key=lambda r: (r["group"], r["seed"])):
        groups.setdefault(r["group"], []).append(r)
    return groups


def _band(ax, x, ys, label):
    n = min(len(y) for y in ys)  # (seeds of a group run the same steps; a shorter one trims the band)
    stack = np.array([y[:n] for y in ys])
    line, = ax.plot(x[:n], stack.mean(0), label=f"{label} ({len(ys)} seed{'s' * (len(ys) > 1)})", lw=1.5)
    if len(ys) > 1:
        ax.fill_between(x[:n], stack.min(0), stack.max(0), color=line.get_color(), alpha=0.2, lw=0)


def plot_report(runs: list[dict], out: Path) -> list[Path]:
    plt = _pyplot()
    groups = _by_group(runs)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    for name, members in groups.items():
        first = members[0]
        steps = np.array([r["step"] for r in first["steps"]], dtype=float)
        tokens_per_step = first["summary"]["tokens"] / max(first["summary"]["step"], 1)
        flops_per_step = first["summary"]["model_flops"] / max(first["summary"]["step"], 1)
        ys = [np.array(smooth_losses([r["loss"] for r in m["steps"]])) for m in members]
        for ax, x in zip(axes, (steps, steps * tokens_per_step, steps * flops_per_step)):
            _band(ax, x, ys, name)
    for ax, label in zip(axes, ("step", "tokens", "training FLOPs")):
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("train loss (smooth, EMA 0.9 debiased)")
    axes[0].legend(fontsize=8)
    _trim_start(axes[0], groups)
    fig.tight_layout()
    paths = [out / "loss.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, members in groups.items():
        x = np.array([e["step"] for e in members[0]["evals"]], dtype=float)
        _band(ax, x, [np.array([e["val_bpb"] for e in m["evals"]]) for m in members], name)
    ax.set_xlabel("step")
    ax.set_ylabel("val bits per byte")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "val_bpb.png")
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths


def _trim_start(ax, groups) -> None:
    """Start the y axis below the first tenth of training, where the curves separate (the first steps' loss is
    several times the final one and would flatten everything after)."""
    tails = [min(smooth_losses([r["loss"] for r in m["steps"]])[len(m["steps"]) // 10:] or [np.inf])
             for ms in groups.values() for m in ms]
    heads = [smooth_losses([r["loss"] for r in m["steps"]])[len(m["steps"]) // 10] for ms in groups.values()
             for m in ms if len(m["steps"]) > 10]
    if heads:
        low, high = min(tails), max(heads)
        ax.set_ylim(low - 0.05 * (high - low), high)
