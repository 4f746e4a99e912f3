"""`jaxchat report`: the seed cards' tables over finished runs, as markdown, csv and json.

- Per seed: one row per run (group, seed, final loss, smooth final loss, val loss, val bpb, tokens, steps, wall
  time, throughput), then each group's mean ± std. The std is the population std (ddof 0), as the cards print
  it: 3.0745, 3.1355, 3.0765 -> 3.0955 ± 0.028.
- Comparison: one row per group (mean ± std over its seeds) and the gap of its mean to the best group's mean, on
  the metric chosen with --metric (default the smooth final loss), best first.

Runs are grouped by the sweep's grid keys (sweep.json), or, for run directories given one by one, by the config
keys whose values differ between them (seed keys excepted).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from jaxchat.config import ConfigError
from jaxchat.experiments.results import read_run
from jaxchat.experiments.sweep import SEED_KEYS

METRICS = {  # column: (header, how it reads from a run, format)
    "final_loss": ("final loss", lambda r: r["summary"].get("final_loss"), "{:.4f}"),
    "smooth_final_loss": ("smooth final loss", lambda r: r["summary"].get("smooth_final_loss"), "{:.4f}"),
    "val_loss": ("val loss", lambda r: r["summary"].get("val_loss"), "{:.4f}"),
    "val_bpb": ("val bpb", lambda r: r["summary"].get("val_bpb"), "{:.4f}"),
    "tokens": ("tokens", lambda r: r["summary"].get("tokens"), "{:,.0f}"),
    "steps": ("steps", lambda r: r["summary"].get("step"), "{:,.0f}"),
    "wall_s": ("wall time s", lambda r: r["summary"].get("wall_s"), "{:,.1f}"),
    "train_s": ("train time s", lambda r: r["summary"].get("train_s"), "{:,.1f}"),
    "tokens_per_s": ("tok/s", lambda r: r["summary"].get("tokens_per_s"), "{:,.0f}"),
}


def collect(paths: list[str | Path]) -> tuple[list[dict], list[str]]:
    """The finished runs under `paths` (sweep folders or run directories) and the keys that group them."""
    runs, keys = [], None
    for path in map(Path, paths):
        if (path / "sweep.json").is_file():
            sweep = json.loads((path / "sweep.json").read_text())
            keys = list(sweep["grid"]) if keys is None else keys
            dirs = [path / "runs" / r["name"] for r in sweep["runs"]]
        elif (path / "config.json").is_file():
            dirs = [path]
        else:
            raise ConfigError(f"{path} is neither a sweep (sweep.json) nor a run directory (config.json)")
        for d in dirs:
            if not (d / "summary.json").is_file():
                raise ConfigError(f"{d} has not finished (no summary.json): finish it (rerun the sweep, or "
                                  f"`jaxchat train --run-dir {d} --resume`) or leave it out")
            runs.append(read_run(d))
    if not runs:
        raise ConfigError("no runs to report: pass a sweep folder or run directories")
    if keys is None:
        keys = differing_keys([r["cfg"] for r in runs])
    for r in runs:
        flat = flat_config(r["cfg"])
        r["group"] = ", ".join(f"{k}={flat[k]}" for k in keys) or "all"
        r["seed"] = flat["train.init_seed"]
    return runs, keys


def flat_config(cfg) -> dict:
    return {f"{sec}.{k}": v for sec, sub in cfg.to_dict().items() for k, v in sub.items()}


def differing_keys(cfgs) -> list[str]:
    flats = [flat_config(c) for c in cfgs]
    return sorted(k for k in flats[0] if k not in SEED_KEYS and len({json.dumps(f[k]) for f in flats}) > 1)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and population standard deviation (ddof 0, as the seed cards)."""
    m = sum(values) / len(values)
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / len(values))


def tables(runs: list[dict], metric: str = "smooth_final_loss") -> dict:
    """{"seeds": rows, "groups": rows, "comparison": rows}: plain values, for json and csv."""
    if metric not in METRICS:
        raise ConfigError(f"--metric {metric!r}: choose one of {', '.join(METRICS)}")
    seeds = [{"group": r["group"], "seed": r["seed"], **{k: get(r) for k, (_, get, _) in METRICS.items()}}
             for r in sorted(runs, key=lambda r: (r["group"], r["seed"]))]
    groups = {}
    for row in seeds:
        groups.setdefault(row["group"], []).append(row)
    summary = []
    for name, rows in groups.items():
        entry = {"group": name, "seeds": len(rows)}
        for k in METRICS:
            values = [row[k] for row in rows if row[k] is not None]
            if values:
                entry[k], entry[f"{k}_std"] = mean_std(values)
        summary.append(entry)
    best = min(e[metric] for e in summary)
    comparison = sorted(({"group": e["group"], "seeds": e["seeds"], metric: e[metric],
                          f"{metric}_std": e[f"{metric}_std"], "gap_to_best": e[metric] - best} for e in summary),
                        key=lambda e: e[metric])
    return {"metric": metric, "seeds": seeds, "groups": summary, "comparison": comparison}


def markdown(t: dict) -> str:
    cols = list(METRICS)
    head = "| group | seed | " + " | ".join(METRICS[k][0] for k in cols) + " |"
    lines = ["## Per seed", "", head, "|" + "---|" * (len(cols) + 2)]
    for row in t["seeds"]:
        lines.append(f"| {row['group']} | {row['seed']} | " + " | ".join(_fmt(k, row[k]) for k in cols) + " |")
    for e in t["groups"]:
        lines.append(f"| {e['group']} | mean ± std ({e['seeds']}) | "
                     + " | ".join(f"{_fmt(k, e.get(k))} ± {_fmt(k, e.get(k + '_std'))}" for k in cols) + " |")
    m = t["metric"]
    lines += ["", f"## Comparison ({METRICS[m][0]}, best first)", "",
              f"| group | seeds | {METRICS[m][0]} (mean ± std) | gap to best |", "|---|---|---|---|"]
    for e in t["comparison"]:
        gap = "best" if e["gap_to_best"] == 0 else f"+{e['gap_to_best']:.4f}"
        lines.append(f"| {e['group']} | {e['seeds']} | {_fmt(m, e[m])} ± {_fmt(m, e[m + '_std'])} | {gap} |")
    return "\n".join(lines) + "\n"


def _fmt(key: str, value) -> str:
    return "n/a" if value is None else METRICS[key][2].format(value)


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
