"""`jaxchat sweep` and `jaxchat report`: argparse wiring (cli.py registers them with `add_parsers`)."""

from __future__ import annotations

from pathlib import Path

from jaxchat.argtypes import positive_int
from jaxchat.config import ConfigError
from jaxchat.experiments.plots import plot_report
from jaxchat.experiments.report import collect, markdown, tables, to_csv
from jaxchat.experiments.sweep import parse_grid, read_spec_file, run_sweep
from jaxchat.fileio import write_json_atomic


def sweep_spec(args) -> dict:
    spec = read_spec_file(args.spec) if args.spec else {}
    if args.preset:
        spec["preset"] = args.preset
    if args.seeds is not None:
        try:
            spec["seeds"] = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            raise ConfigError(f"--seeds {args.seeds!r}: write integers separated by commas, e.g. 0,1,2") from None
    if args.set:
        spec["set"] = list(spec.get("set") or []) + args.set
    if args.budget is not None:
        spec["budget"] = args.budget
    if args.grid:
        spec["grid"] = {**(spec.get("grid") or {}), **parse_grid(args.grid)}
    return spec


def cmd_sweep(args) -> None:
    runs = run_sweep(args.out, sweep_spec(args), parallel=args.parallel)
    print(f"sweep {args.out}: {len(runs)} run(s) finished\n")
    write_report([args.out], Path(args.out) / "report", "smooth_final_loss", plots=False)


def cmd_report(args) -> None:
    out = Path(args.out) if args.out else (Path(args.paths[0]) / "report" if len(args.paths) == 1 else None)
    write_report(args.paths, out, args.metric, plots=not args.no_plots)


def write_report(paths, out: Path | None, metric: str, plots: bool) -> None:
    """Print the tables; with `out`, also write them (md, csv, json) and, with `plots`, the PNG plots."""
    runs, keys = collect(paths)
    t = tables(runs, metric)
    text = markdown(t)
    print(text, end="")
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text)
    (out / "seeds.csv").write_text(to_csv(t["seeds"]))
    (out / "comparison.csv").write_text(to_csv(t["comparison"]))
    write_json_atomic(out / "report.json", {"grouped_by": keys, **t})
    written = ["report.md", "seeds.csv", "comparison.csv", "report.json"]
    if plots:
        written += [p.name for p in plot_report(runs, out)]
    print(f"wrote {', '.join(written)} to {out}")


def add_parsers(sub) -> None:
    s = sub.add_parser("sweep", help="a preset x a grid of --set values x seeds, one run directory each; resumable")
    s.add_argument("--out", required=True, help="the sweep's folder (runs/NAME inside; rerun to finish a sweep)")
    s.add_argument("--spec", help="a TOML or YAML file with preset, seeds, set and [grid] (the flags add to it)")
    s.add_argument("--preset", help="the base preset (default tiny)")
    s.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a swept config key and its values (repeatable: the grid is their product)")
    s.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2 (each sets train.init_seed and "
                                   "data.data_seed; default 0)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="applied to every run")
    s.add_argument("--budget", type=float, metavar="FRACTION",
                   help="train this fraction of the preset's steps (and warmup), e.g. 0.01 for a seed card")
    s.add_argument("--parallel", type=positive_int, default=1,
                   help="runs at once (on CUDA GPUs, each child gets one GPU)")
    s.set_defaults(fn=cmd_sweep)

    r = sub.add_parser("report", help="the seed cards' tables (per seed, mean ± std, gap to best) and plots")
    r.add_argument("paths", nargs="+", metavar="SWEEP_OR_RUN", help="a sweep folder, or run directories")
    r.add_argument("--out", help="where report.md, csv, json and PNG plots go (default SWEEP/report)")
    r.add_argument("--metric", default="smooth_final_loss",
                   help="the comparison's metric: smooth_final_loss, final_loss, val_loss, val_bpb, ...")
    r.add_argument("--no-plots", action="store_true", help="tables only (no matplotlib needed)")
    r.set_defaults(fn=cmd_report)

