"""`jaxchat import flaxchat|nanochat|golf` and `jaxchat export`: argparse wiring.

cli.py registers these with `add_parsers(subparsers)`. User errors raise InteropError or CheckpointError.
"""

from __future__ import annotations

from pathlib import Path

from jaxchat.golf.commands import add_export_args, cmd_export_golf
from jaxchat.interop import common
from jaxchat.interop.common import InteropError
from jaxchat.averaging import WEIGHTS
from jaxchat.interop.export import export_safetensors
from jaxchat.interop.flaxchat import MLP_CHOICES, find_step_dir, import_flaxchat
from jaxchat.interop.golf import import_golf
from jaxchat.interop.hf import HF_TYPES, export_hf, push_to_hub, validate_repo
from jaxchat.interop.nanochat_files import import_nanochat


EXPORT_FORMATS = ("safetensors", "hf", "golf")


def from_hub(repo: str, revision: str | None, args, use_config: bool, log=print) -> Path:
    """Download `repo` (through common.download_from_hub, so tests can stand a local directory in) and return
    its local root. The repo's own tokenizer.json (and, for flaxchat, config.json) stand in for --tokenizer
    (--config) when those are not given."""
    root = Path(common.download_from_hub(repo, revision))
    log(f"downloaded {repo} to {root}")
    if use_config and args.config is None and (root / "config.json").is_file():
        args.config = str(root / "config.json")
        log("using the repo's config.json as --config")
    if args.tokenizer is None and (root / "tokenizer.json").is_file():
        args.tokenizer = str(root / "tokenizer.json")
        log("using the repo's tokenizer.json as --tokenizer")
    return root


def cmd_import_flaxchat(args) -> None:
    if args.from_hub:
        root = from_hub(args.from_hub, args.revision, args, use_config=True)
        path = find_step_dir(root / args.step_dir if args.step_dir else root)
    elif args.step_dir is None:
        raise InteropError("give the flaxchat STEP_DIR (e.g. hf_model/19920) or --from-hub REPO")
    else:
        path = Path(args.step_dir)
    import_flaxchat(path, args.mlp, args.out, config=args.config, tokenizer=args.tokenizer, overrides=args.set,
                    force=args.force, weights_only=args.weights_only)


def cmd_import_nanochat(args) -> None:
    if args.from_hub:
        root = from_hub(args.from_hub, args.revision, args, use_config=False)
        path = root / args.checkpoint if args.checkpoint else root
    elif args.checkpoint is None:
        raise InteropError("give the nanochat CHECKPOINT_DIR (or an .npz state dict) or --from-hub REPO")
    else:
        path = Path(args.checkpoint)
    import_nanochat(path, args.out, step=args.step, tokenizer=args.tokenizer, config=args.config,
                    overrides=args.set, force=args.force)


def cmd_import_golf(args) -> None:
    import_golf(args.state, args.out, config=args.config, tokenizer=args.tokenizer, overrides=args.set,
                force=args.force)


def cmd_export(args) -> None:
    if args.format not in EXPORT_FORMATS:
        raise InteropError(f"--format {args.format!r}: choose one of {', '.join(EXPORT_FORMATS)}")
    if args.format != "hf" and (args.push_to_hub or args.hf_type != "auto"):
        raise InteropError("--push-to-hub and --hf-type apply to --format hf only")
    if not Path(args.run).is_dir():
        raise InteropError(f"{args.run} is not a directory: give a jaxchat run directory (the --run-dir of "
                           f"`jaxchat train`)")
    if args.format == "golf":
        cmd_export_golf(args)
        return
    if args.format == "safetensors":
        export_safetensors(args.run, args.out, step=args.step, force=args.force, weights=args.weights)
        return
    if args.push_to_hub:
        validate_repo(args.push_to_hub)  # before the export, so a typo costs nothing
    out = export_hf(args.run, args.out, step=args.step, force=args.force, hf_type=args.hf_type,
                    weights=args.weights)
    if args.push_to_hub:
        push_to_hub(out, args.push_to_hub, private=args.private)


def _common_import_args(p, hub: bool = True) -> None:
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="the jaxchat run directory to write")
    p.add_argument("--tokenizer", metavar="TOKENIZER",
                   help="the HF tokenizer.json (or sentencepiece .model, e.g. golf's sp1024) the checkpoint was "
                        "trained with; copied into the run so eval, sample and train --resume use it (without "
                        "it, the run has no tokenizer yet)")
    if hub:
        p.add_argument("--from-hub", metavar="REPO", help="download this Hugging Face Hub repo first, then import "
                       "from it (the positional path, if given, is then relative to the repo)")
        p.add_argument("--revision", help="hub revision (branch, tag or commit) for --from-hub")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override the written run's optim/data/train config, e.g. --set optim.lr=0.03")
    p.add_argument("--force", action="store_true", help="replace an existing jaxchat run in --out")


def add_parsers(sub) -> None:
    """Register `import` (with `flaxchat`, `nanochat` and `golf`) and `export` on the CLI's subparsers."""
    imp = sub.add_parser("import", help="turn a flaxchat, nanochat or golf checkpoint into a jaxchat run directory")
    src = imp.add_subparsers(dest="source", required=True)

    f = src.add_parser("flaxchat", help="a flaxchat Orbax checkpoint step directory (model/, optimizer/, ...)")
    f.add_argument("step_dir", nargs="?", metavar="STEP_DIR", help="e.g. hf_model/19920")
    f.add_argument("--mlp", required=True, choices=MLP_CHOICES, help="the MLP the checkpoint was trained with")
    f.add_argument("--config", help="flaxchat GPTConfig JSON (file path or inline); without it the shapes and "
                   "checkpoint metadata decide, and sequence_len / window_pattern take flaxchat's defaults")
    f.add_argument("--weights-only", action="store_true", help="skip the optimizer state (start it fresh)")
    _common_import_args(f)
    f.set_defaults(fn=cmd_import_flaxchat)

    n = src.add_parser("nanochat", help="a nanochat checkpoint: model_N.pt + meta_N.json (needs torch), or the "
                       "npz state-dict form")
    n.add_argument("checkpoint", nargs="?", metavar="CHECKPOINT_DIR", help="directory, .npz or .pt file")
    n.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    n.add_argument("--config", help="nanochat GPTConfig JSON (file or inline) when meta_N.json is missing")
    _common_import_args(n)
    n.set_defaults(fn=cmd_import_nanochat)

    g = src.add_parser("golf", help="a parameter-golf (PR #334 GPT) state dict: .npz of param/<name> arrays, or .pt "
                       "(needs torch)")
    g.add_argument("state", metavar="STATE", help="the state dict file")
    g.add_argument("--config", help="the reference GPT(...) keyword arguments as JSON (file or inline); default: the "
                   "npz's `config` entry")
    _common_import_args(g, hub=False)
    g.set_defaults(fn=cmd_import_golf)

    e = sub.add_parser("export", help="write a run's weights as safetensors with a documented config.json, or as a "
                       "Hugging Face transformers model (--format hf), or a parameter-golf artifact (--format golf)")
    e.add_argument("run", metavar="RUN_DIR")
    e.add_argument("--format", default="safetensors", choices=EXPORT_FORMATS,
                   help="safetensors: jaxchat's own names and layout; hf: a directory transformers' "
                        "AutoModelForCausalLM loads (docs/interop.md); golf: the quantised, compressed artifact "
                         "(docs/golf.md)")
    e.add_argument("--hf-type", default="auto", choices=HF_TYPES,
                   help="hf only: nanochat = transformers' own model type (no remote code; only for runs with "
                        "exactly that architecture), jaxchat = jaxchat's PyTorch model (trust_remote_code=True, "
                        "every switch), auto = nanochat where it fits, else jaxchat")
    e.add_argument("--push-to-hub", metavar="REPO", help="hf only: then upload the directory to this Hugging Face "
                   "Hub model repo (OWNER/NAME; created if missing; needs jaxchat[hub] and a login)")
    e.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    e.add_argument("--out", required=True, metavar="DIR")
    e.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    e.add_argument("--force", action="store_true", help="write into a non-empty --out")
    e.add_argument("--weights", choices=WEIGHTS, default="raw",
                   help="the trained params, or their EMA / SWA average (train.ema_decay, train.swa_lr_below)")
    add_export_args(e)  # --quant, --compressor, --allow-over-cap (--format golf)
    e.set_defaults(fn=cmd_export)
