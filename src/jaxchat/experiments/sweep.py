"""`jaxchat sweep`: a base preset x a grid of --set values x seeds, each an ordinary run directory inside the
sweep's folder, run one after another or several at once, and resumable.

    SWEEP/sweep.json        the spec and the expanded list of runs (a different spec in the same folder is refused)
    SWEEP/runs/NAME/        one jaxchat run directory per (grid point, seed), NAME e.g. mlp=gelu_seed=1

A seed sets both `train.init_seed` and `data.data_seed`, so the runs of one seed see the same batches whatever
the grid point (the cards' "same data"). Every run is a child `jaxchat train` process (a failure or a kill stays
in its run directory); a rerun of the same command skips finished runs (summary.json at the run's last step),
resumes interrupted ones (--resume) and starts the rest. Every run's config is built and checked before the
first one starts, so a bad spec costs nothing.

A spec is given on the command line (--preset, --grid KEY=V1,V2 ..., --seeds, --set) or in a TOML or YAML file:

    preset = "tiny"
    seeds = [0, 1, 2]
    set = ["train.num_steps=150"]
    budget = 1.0          # optional: this fraction of the preset's steps (and warmup), e.g. 0.01 for a card
    [grid]
    "model.mlp" = ["relu2", "gelu"]
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from jaxchat.config import ConfigError
from jaxchat.overrides import all_keys, apply_overrides
from jaxchat.fileio import write_json_atomic
from jaxchat.plan import resolve
from jaxchat.presets import get_preset
from jaxchat.rundir import MARKER

SEED_KEYS = ("train.init_seed", "data.data_seed")


def read_spec_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--spec {path}: no such file; write a TOML (or YAML) file with preset, seeds, set and "
                          f"[grid] (see `jaxchat sweep --help`)")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml  # (PyYAML: optional, only for YAML specs; it comes with flax)
            spec = yaml.safe_load(text)
        else:
            spec = tomllib.loads(text)
    except Exception as e:  # tomllib / yaml parse errors
        raise ConfigError(f"--spec {path} does not parse: {type(e).__name__}: {e}") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"--spec {path} must be a table with preset, seeds, set and grid")
    unknown = set(spec) - {"preset", "seeds", "set", "grid", "budget"}
    if unknown:
        raise ConfigError(f"--spec {path}: unknown entries {sorted(unknown)}; use preset, seeds, set, grid and "
                          f"budget")
    return spec


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """--grid KEY=V1,V2 (repeatable) -> {KEY: [V1, V2]}."""
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--grid {item!r}: write KEY=V1,V2,... e.g. --grid model.mlp=relu2,gelu")
        grid[key.strip()] = [v.strip() for v in values.split(",") if v.strip()]
    return grid


def run_name(point: dict[str, str], seed: int) -> str:
    """A folder name for a grid point and seed: the last part of each key, e.g. mlp=gelu_seed=1."""
    parts = [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in point.items()] + [f"seed={seed}"]
    return re.sub(r"[^A-Za-z0-9_.=+-]", "-", "_".join(parts))


def budget_sets(preset: str, sets: list[str], fraction: float, devices: int = 1) -> list[str]:
    """The --set values that train `fraction` of the preset's horizon: its steps and its warmup (AdamW's
    optim.warmup_steps) scaled, each at least 1, so the schedule keeps its shape (a card at 1% of its budget)."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"budget {fraction} must be a fraction in (0, 1] of the preset's horizon")
    cfg = resolve(apply_overrides(get_preset(preset), sets), devices)
    return [f"train.num_steps={max(1, round(cfg.train.num_steps * fraction))}",
            f"optim.warmup_steps={max(1, round(cfg.optim.warmup_steps * fraction))}"]


def expand(spec: dict, devices: int = 1) -> list[dict]:
    """Every (grid point, seed) of the spec as {name, point, seed, sets}; each config is built and validated."""
    preset, seeds, base = spec.get("preset") or "tiny", list(spec.get("seeds") or [0]), list(spec.get("set") or [])
    if spec.get("budget") is not None:
        base = base + budget_sets(preset, base, float(spec["budget"]), devices)
    grid = {k: [str(v) for v in (vals if isinstance(vals, list) else [vals])]
            for k, vals in (spec.get("grid") or {}).items()}
    keys = set(all_keys())
    for key, values in grid.items():
        if key not in keys:
            raise ConfigError(f"grid key {key!r} is not a config key (see `jaxchat presets --keys`)")
        if not values:
            raise ConfigError(f"grid key {key!r} has no values: give at least one, e.g. {key}=A,B")
        if len(set(values)) != len(values):
            raise ConfigError(f"grid key {key!r} repeats a value: {values}")
        if key in SEED_KEYS:
            raise ConfigError(f"grid key {key!r} is set by the seeds: use --seeds instead")
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise ConfigError(f"seeds {seeds} must be integers >= 0")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds {seeds} repeat a seed: each seed is one run per grid point")
    base_cfg = get_preset(preset)  # (an unknown preset fails here)
    runs = []
    for combo in itertools.product(*grid.values()) if grid else [()]:
        point = dict(zip(grid, combo))
        for seed in seeds:
            sets = base + [f"{k}={v}" for k, v in point.items()] + [f"{k}={seed}" for k in SEED_KEYS]
            try:
                resolve(apply_overrides(base_cfg, sets), devices)
            except ConfigError as e:
                raise ConfigError(f"the run {run_name(point, seed)} of this sweep is not a valid config: {e}") from None
            runs.append({"name": run_name(point, seed), "point": point, "seed": seed, "sets": sets})
    return runs


def prepare_sweep(out: Path, spec: dict, devices: int = 1) -> list[dict]:
    """Validate the spec, expand it, and write (or check) SWEEP/sweep.json. Returns the runs."""
    runs = expand(spec, devices)
    record = {"preset": spec.get("preset") or "tiny", "budget": spec.get("budget"),
              "seeds": list(spec.get("seeds") or [0]),
              "set": list(spec.get("set") or []), "grid": {k: [str(v) for v in vs] if isinstance(vs, list) else
                                                          [str(vs)] for k, vs in (spec.get("grid") or {}).items()},
              "runs": runs}
    path = out / "sweep.json"
    if path.is_file():
        old = json.loads(path.read_text())
        if {k: old.get(k) for k in record} != record:
            raise ConfigError(f"{out} holds another sweep (its sweep.json differs from this spec): rerun it with "
                              f"its own spec to finish it, or choose another --out")
    elif out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} exists and is not a sweep (no sweep.json): choose a new directory")
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, record)
    return runs


def state_of(run_dir: Path, sets: list[str], preset: str) -> str:
    """'finished' (summary.json at the last step), 'started' (a config to resume), 'marked' (killed before its
    config), or 'new'."""
    if (run_dir / "summary.json").is_file():
        steps = resolve(apply_overrides(get_preset(preset), sets), 1).train.num_steps
        if json.loads((run_dir / "summary.json").read_text()).get("step") == steps:
            return "finished"
    if (run_dir / "config.json").is_file():
        return "started"
    return "marked" if (run_dir / MARKER).is_file() else "new"


def command(run: dict, run_dir: Path, preset: str, state: str) -> list[str]:
    flags = {"started": ["--resume"], "marked": ["--force"]}.get(state, [])
    args = [sys.executable, "-m", "jaxchat.cli", "train", "--run-dir", str(run_dir)] + flags
    if state != "started":  # (a resumed run keeps its recorded config; the sets below are the same)
        args += ["--preset", preset]
    return args + [a for s in run["sets"] for a in ("--set", s)]


def run_sweep(out: str | Path, spec: dict, parallel: int = 1, log=print) -> list[dict]:
    """Run every unfinished run of the sweep, `parallel` at a time; returns the runs with their outcome."""
    out = Path(out)
    preset = spec.get("preset") or "tiny"
    runs = prepare_sweep(out, spec)
    todo = []
    for run in runs:
        run_dir = out / "runs" / run["name"]
        run["state"] = state_of(run_dir, run["sets"], preset)
        if run["state"] == "finished":
            log(f"sweep: {run['name']}: finished, kept")
        else:
            todo.append(run)
    gpus, started = _cuda_devices(), 0
    active: list[tuple[dict, subprocess.Popen]] = []
    (out / "logs").mkdir(exist_ok=True)
    while todo or active:
        while todo and len(active) < parallel:
            run = todo.pop(0)
            run_dir = out / "runs" / run["name"]
            run_dir.parent.mkdir(exist_ok=True)
            env = dict(os.environ)
            if gpus and parallel > 1:  # one GPU per child, round robin over the ones this process sees
                env["CUDA_VISIBLE_DEVICES"] = gpus[started % len(gpus)]
            started += 1
            log(f"sweep: {run['name']}: {'resuming' if run['state'] == 'started' else 'starting'}")
            with open(out / "logs" / f"{run['name']}.log", "a") as fh:
                active.append((run, subprocess.Popen(command(run, run_dir, preset, run["state"]), stdout=fh,
                                                     stderr=subprocess.STDOUT, env=env)))
        time.sleep(0.2)
        for run, proc in list(active):
            if proc.poll() is not None:
                active.remove((run, proc))
                run["returncode"] = proc.returncode
                log(f"sweep: {run['name']}: " + ("finished" if proc.returncode == 0 else
                                                 f"failed (exit {proc.returncode}); see {out}/logs/{run['name']}.log"))
    failed = [r["name"] for r in runs if r.get("returncode", 0) != 0]
    if failed:
        raise ConfigError(f"{len(failed)} run(s) of the sweep failed: {', '.join(failed)}; their logs are in "
                          f"{out}/logs/. Rerun the same command to retry them (finished runs are kept).")
    return runs


def _cuda_devices() -> list[str]:
    """The CUDA devices this process may use (CUDA_VISIBLE_DEVICES, else nvidia-smi's count), or []."""
    if os.environ.get("CUDA_VISIBLE_DEVICES"):
        return [d for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(listed.splitlines()) if line.startswith("GPU ")]
