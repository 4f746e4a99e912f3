"""Compile time of the train step with unrolled layers versus `model.scan_layers`, from shapes only.

    python benchmarks/compile_time.py --preset nanochat-d12 [--preset ...] [--set KEY=VALUE ...]

Each variant compiles in a fresh process with the persistent compilation cache off, through the same path as
`jaxchat train --dry-run` (the real train step, lowered from ShapeDtypeStructs: nothing is allocated, so any
preset compiles on a laptop). Prints one markdown row per variant: compile seconds and XLA's peak-memory figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"unrolled": ["model.scan_layers=false"], "scan": ["model.scan_layers=true"]}

CHILD = """
import json, sys
from jaxchat.overrides import apply_overrides
from jaxchat.dryrun import dry_run
from jaxchat.model.scan import describe
from jaxchat.presets import get_preset
cfg = apply_overrides(get_preset(sys.argv[1]), sys.argv[2:])
out = dry_run(cfg, search=False, log=lambda *a: None)
print(json.dumps({"compile_s": out["compile_s"], "peak_bytes": out["peak_bytes"], "layers": describe(cfg.model),
                  "device": out["device_kind"], "micro": out["device_batch"], "accum": out["grad_accum"]}))
"""


def measure(preset: str, sets: list[str]) -> dict:
    env = {**os.environ, "JAXCHAT_COMPILE_CACHE": "off",
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-c", CHILD, preset, *sets], env=env, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{preset} {sets}: failed\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", action="append", required=True)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    print("| preset | layers | device | micro-batch x accum | compile s | XLA peak GiB |")
    print("|---|---|---|---|---|---|")
    for preset in args.preset:
        for sets in VARIANTS.values():
            r = measure(preset, args.set + sets)
            print(f"| {preset} {' '.join(args.set)} | {r['layers']} | {r['device']} | {r['micro']} x {r['accum']} | "
                  f"{r['compile_s']:.1f} | {r['peak_bytes'] / 2**30:.2f} |", flush=True)


if __name__ == "__main__":
    main()
