"""`jaxchat train | eval | sample | params | plan | presets`, and the commands other modules register (data,
tokenizer, import, export, bench, sweep, report, chat, serve, sft).

Errors a user can fix (bad config, missing run, wrong checkpoint) print one message and exit with status 2;
Ctrl-C prints where the command stopped and exits with 130; anything else is a bug and keeps its traceback.
Arguments are checked by their argparse types before a command reads or writes anything.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path

from jaxchat import __version__, bench
from jaxchat.argtypes import count_int, finite_non_negative, positive_float, positive_int, step_range
from jaxchat.averaging import WEIGHTS
from jaxchat.chat.commands import add_parsers as add_chat_parsers
from jaxchat.checkpoint import CheckpointError
from jaxchat.compilation import enable_compilation_cache
from jaxchat.config import ConfigError
from jaxchat.keyhelp import format_keys
from jaxchat.overrides import apply_overrides, config_from_file
from jaxchat.cpu_runtime import tune_cpu_runtime
from jaxchat.data.commands import add_parsers as add_data_parsers
from jaxchat.distributed import JobError, initialize
from jaxchat.dryrun import dry_run, parse_bytes
from jaxchat.evals.commands import add_eval_arguments, run_evals
from jaxchat.evaluate import compressor_bpb, eval_rows, evaluate, make_eval_step, target_bytes
from jaxchat.experiments.commands import add_parsers as add_experiment_parsers
from jaxchat.golf.commands import add_eval_args as add_golf_eval_args, add_parsers as add_golf_parsers
from jaxchat.golf.commands import cmd_eval_artifact, eval_sliding
from jaxchat.interop.commands import add_parsers as add_interop_parsers
from jaxchat.interop.common import InteropError
from jaxchat.loop import Interrupted, run_training
from jaxchat.model.accounting import count, levanter_flops
from jaxchat.plan import make_plan
from jaxchat.presets import PRESETS, get_preset
from jaxchat.run import Run, load_dataset
from jaxchat.rundir import load_run_config
from jaxchat.sample import Sampler
from jaxchat.train import NonFiniteError

WEIGHTS_HELP = ("the trained params (raw), or their EMA / SWA average, kept when the run trained with "
                "train.ema_decay / train.swa_lr_below")
USER_ERRORS = (ConfigError, CheckpointError, InteropError, FileNotFoundError, JobError)


def cmd_train(args) -> None:
    if args.dry_run and (args.distributed or args.coordinator):
        raise ConfigError("--dry-run compiles from shapes in one process: run it without --distributed/--coordinator "
                          "(pass --memory-limit for the device you will train on)")
    initialize(args.coordinator, args.num_processes, args.process_id, auto=args.distributed)  # before any device use
    if args.run_dir is not None and not args.run_dir.strip():
        raise ConfigError(f"--run-dir {args.run_dir!r} is empty: pass a directory, e.g. --run-dir runs/tiny (or omit "
                          f"it for runs/<preset>)")
    if args.config and (args.preset or args.resume):
        raise ConfigError("--config gives the whole config: drop --preset (and --resume, which continues a run with "
                          "its own recorded config); change single values with --set")
    run_dir = Path(args.run_dir or f"runs/{args.preset or (Path(args.config).stem if args.config else 'tiny')}")
    if args.config:
        cfg = config_from_file(args.config)
    elif args.resume and not args.preset:
        cfg = load_run_config(run_dir)  # continue the run with its own config (plus any --set)
    else:
        cfg = get_preset(args.preset or "tiny")
    keep = [f"train.keep_last={args.keep_last}"] * (args.keep_last is not None) + \
        [f"train.keep_every={args.keep_every}"] * (args.keep_every is not None)
    cfg = apply_overrides(cfg, args.set + keep)
    if args.profile and cfg.train.num_steps > 0 and args.profile[1] - 1 > cfg.train.num_steps:
        a, b = args.profile  # (checked again against the resumed step once the run is loaded: profiling.py)
        raise ConfigError(f"--profile {a}:{b} traces steps {a}..{b - 1}, but this run executes steps "
                          f"1..{cfg.train.num_steps}: pick a range inside it")
    if args.dry_run:
        dry_run(cfg, memory_limit=parse_bytes(args.memory_limit) if args.memory_limit else None)
        return
    try:
        run_training(cfg, run_dir, resume=args.resume, force=args.force, prompt=args.prompt,
                     peak_tflops=args.peak_tflops, profile=args.profile)
    except NonFiniteError as e:
        print(f"jaxchat train: halted: {e}", file=sys.stderr)
        raise SystemExit(3) from None
    except Interrupted as e:
        print(f"jaxchat train: {e}", file=sys.stderr)
        raise SystemExit(130) from None


def cmd_eval(args) -> None:
    if args.artifact:
        cmd_eval_artifact(args)
        return
    if run_evals(args):  # --core / --chat (evals/commands.py)
        return
    if args.run is None:
        raise ConfigError("jaxchat eval needs --run RUN_DIR (a checkpoint) or --artifact FILE (a golf artifact)")
    if (args.context or args.sliding_tail != "reference" or args.ttt) and not args.stride:
        raise ConfigError("--context, --sliding-tail and --ttt score with the sliding-window eval: add --stride N "
                          "(golf: 64)")
    run = Run.load(args.run, args.step)
    params = run.weights(args.weights)  # (a run without such weights fails here, before the dataset is read)
    tok = run.tokenizer
    ds = load_dataset(run.cfg, log=lambda *a: None)
    if ds.tokenizer.fingerprint() != tok.fingerprint():
        raise CheckpointError(f"the dataset's tokenizer differs from the one in {args.run}: the run's data "
                              f"config no longer reproduces its tokenizer (different Python stdlib?)")
    if args.stride:  # golf's sliding-window score, with test-time training when asked (golf/commands.py)
        eval_sliding(args, run, params, ds.val_rows, _weights_note(args))
        return
    rows = eval_rows(ds.val_rows, args.batch_size, args.tokens or run.cfg.train.eval_tokens)
    out = evaluate(make_eval_step(run.fns, tok.byte_rule()), params, rows, args.batch_size)
    ref = compressor_bpb(target_bytes(tok, rows))
    print(f"{args.run} step {int(run.state['step'])}{_weights_note(args)}: val loss {out['val_loss']:.4f} | "
          f"val bpb {out['val_bpb']:.4f} | "
          f"gzip -9 {ref['gzip_bpb']:.3f} | xz -9e {ref['xz_bpb']:.3f} bits/byte "
          f"({out['val_tokens']:,} tokens, {out['val_bytes']:,} bytes)")


def _weights_note(args) -> str:
    return f" ({args.weights} weights)" if args.weights != "raw" else ""


def cmd_sample(args) -> None:
    run = Run.load(args.run, args.step)
    tok = run.tokenizer
    ids = [tok.bos_id] + tok.encode(args.prompt)
    out = Sampler(run.fns).generate(run.weights(args.weights), ids, args.max_tokens, args.temperature, args.top_k,
                                    args.seed)
    print(args.prompt + tok.decode_after(ids[1:], out))


def cmd_params(args) -> None:
    cfg = apply_overrides(get_preset(args.preset), args.set)
    c = count(cfg.model)
    total = c.params["total"]
    print(f"{args.preset}: {total:,} parameters")
    order = ["embed", "value_embeds", "attention", "mlp", "lm_head", "ve_gates", "scalars"]
    for k in order:
        if k in c.params:
            print(f"  {k:<13} {c.params[k]:>14,}  {100 * c.params[k] / total:5.1f}%")
    if cfg.model.tie_embeddings:
        print("  (lm_head tied to embed)")
    f = c.flops
    print(f"FLOPs per token (training, 6N + attention): {f['total']:,} = {f['total']:.3e}")
    for k in ("lm_head", "mlp", "attention", "gates"):
        print(f"  {k:<13} {f[k]:>14,}  {100 * f[k] / f['total']:5.1f}%")
    lf = levanter_flops(cfg.model)
    print(f"FLOPs per token (forward, Levanter's lm_flops_per_token): {lf['total']:,} = lm_head {lf['lm_head']:,} "
          f"+ mlp {lf['mlp']:,} + attention {lf['attention']:,}")


def cmd_plan(args) -> None:
    cfg = apply_overrides(get_preset(args.preset), args.set)
    p = make_plan(cfg, args.devices)
    print(f"{args.preset} on {p['devices']} device(s), optimizer {p['optimizer']}")
    print(f"  total batch      {p['batch_tokens']:>16,} tokens ({p['batch_sequences']:,} x {cfg.model.sequence_len})")
    print(f"  per device       {p['device_batch_size']:>16,} sequences x {p['grad_accum']} accumulation steps")
    print(f"  steps            {p['num_steps']:>16,}")
    print(f"  tokens           {p['tokens']:>16,} ({p['tokens'] / 1e9:.2f}B; "
          f"{p['tokens_per_scaling_param']:.1f} per scaling param, N = {p['scaling_params']:,}; "
          f"{p['tokens_per_param']:.2f} per parameter)")
    print(f"  FLOPs            {p['total_flops']:>16.3e} ({p['flops_per_token']:,} per token)")
    print("  groups:")
    for g in p["groups"]:
        betas = f"betas {tuple(g['betas'])}" if g.get("betas") else "Nesterov momentum"
        print(f"    {g['group']:<14} {g['kind']:<6} {g['params']:>13,} params  lr {g['lr']:.5g}  "
              f"wd {g['wd']:.5g}  {betas}")


def cmd_presets(args) -> None:
    if args.keys:
        print(format_keys())
        return
    width = max(map(len, PRESETS))
    for name, (desc, _) in PRESETS.items():
        print(f"{name:<{width}}  {desc}")
    if args.show:
        print(json.dumps(get_preset(args.show).to_dict(), indent=2))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxchat", description="Train nanochat-style GPTs in JAX.")
    p.add_argument("--version", action="version", version=f"jaxchat {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train a preset (default tiny) into a run directory")
    t.add_argument("--preset", help="preset name (jaxchat presets); default tiny, or the run's own with --resume")
    t.add_argument("--config", metavar="FILE", help="the whole config from a file instead of a preset: a run's "
                   "config.json, or TOML with [model] [optim] [data] [train] tables (--set applies on top)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.num_steps=100 (repeatable)")
    t.add_argument("--run-dir", help="where config, checkpoints and metrics go (default runs/<preset>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its latest checkpoint")
    t.add_argument("--force", action="store_true", help="delete an existing run in --run-dir and start over")
    t.add_argument("--prompt", default="def ", help="prompt of the sample printed at the end")
    t.add_argument("--peak-tflops", type=positive_float, metavar="TFLOPS",
                   help="peak TFLOP/s per device for MFU (default: the datasheet peak of known accelerators; on a CPU "
                        "a matmul rate measured once and cached)")
    t.add_argument("--profile", type=step_range, metavar="A:B",
                   help="write a jax.profiler trace of steps A..B-1 (e.g. 5:8) into RUN_DIR/profile")
    t.add_argument("--keep-last", type=int, metavar="N", help="keep the last N checkpoints (>= 2; train.keep_last)")
    t.add_argument("--keep-every", type=int, metavar="M",
                   help="also keep every checkpoint whose step M divides, for good (train.keep_every)")
    t.add_argument("--dry-run", action="store_true",
                   help="compile the step from shapes only and print parameter, optimizer and peak memory and the "
                        "largest device batch that fits; allocates no weights, writes nothing")
    t.add_argument("--memory-limit", metavar="SIZE",
                   help="--dry-run: device memory to fit into, e.g. 80GB (default: the device's; host RAM on CPU)")
    d = t.add_argument_group("several processes (multi-host; run the same command in each, run dir on a shared "
                             "filesystem; process 0 writes and prints)")
    d.add_argument("--distributed", action="store_true",
                   help="join a multi-process job JAX detects by itself (TPU pod slice, SLURM, Open MPI)")
    d.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address, for a job started by hand")
    d.add_argument("--num-processes", type=int, metavar="N", help="processes in the job (with --coordinator)")
    d.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0..N-1 (with --coordinator)")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="validation loss and bits per byte of a run's checkpoint or a golf artifact; "
                       "sliding window and TTT (--stride), CORE (--core) and chat evals (--chat)")
    e.add_argument("--run", help="run directory")
    e.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    e.add_argument("--tokens", type=count_int, default=0, help="validation tokens (default: the run's eval_tokens)")
    e.add_argument("--batch-size", type=positive_int, default=8, help="rows (with --stride: windows) per batch")
    e.add_argument("--weights", choices=WEIGHTS, default="raw", help=WEIGHTS_HELP)
    add_golf_eval_args(e)  # --artifact
    add_eval_arguments(e)  # --core, --chat (evals/commands.py)
    e.set_defaults(fn=cmd_eval)

    s = sub.add_parser("sample", help="generate text from a run's checkpoint")
    s.add_argument("--run", required=True, help="run directory")
    s.add_argument("--prompt", default="def ")
    s.add_argument("--temperature", type=finite_non_negative, default=0.8, help="0 = greedy")
    s.add_argument("--top-k", type=count_int, default=50, help="keep the k most likely tokens (0 = all)")
    s.add_argument("--max-tokens", type=positive_int, default=128)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    s.add_argument("--weights", choices=WEIGHTS, default="raw", help=WEIGHTS_HELP)
    s.set_defaults(fn=cmd_sample)

    pa = sub.add_parser("params", help="parameter split and FLOPs per token of a preset")
    pa.add_argument("--preset", required=True)
    pa.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    pa.set_defaults(fn=cmd_params)

    pl = sub.add_parser("plan", help="batch, accumulation, steps, tokens, FLOPs and every group's lr/wd of a preset")
    pl.add_argument("--preset", required=True)
    pl.add_argument("--devices", type=int, default=1, help="number of devices the run will use")
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    pl.set_defaults(fn=cmd_plan)

    pr = sub.add_parser("presets", help="list presets with one-line descriptions")
    pr.add_argument("--show", metavar="NAME", help="also print one preset's full config")
    pr.add_argument("--keys", action="store_true", help="list every config key --set accepts, with its type, "
                    "default and a line of help")
    pr.set_defaults(fn=cmd_presets)

    add_interop_parsers(sub)  # import flaxchat|nanochat, export
    add_data_parsers(sub)  # data prepare|pack|info|verify, tokenizer train|eval
    bench.add_parsers(sub)  # bench
    add_experiment_parsers(sub)  # sweep, report
    add_chat_parsers(sub)  # chat, serve, sft
    add_golf_parsers(sub)  # golf
    return p


def _drop_abandoned_orbax_reads(unraisable) -> None:
    """sys.unraisablehook: after a restore fails on one array, Orbax abandons the reads of the others; the failure
    itself is already reported in one message (checkpoint.py). Two kinds of report of those reads are dropped:
    - a coroutine of Orbax's that fails when collected, printed as a page of TensorStore spec;
    - a read that completes after Orbax closed its event loop: TensorStore's callback, on its own thread, calls
      the loop's call_soon_threadsafe, which raises "Event loop is closed", and TensorStore reports that as
      unraisable with no object (a bare traceback; docs/LOG.md, session 16).
    Everything else goes to Python's own hook."""
    code = getattr(unraisable.object, "cr_code", None)
    if code is not None and "orbax" in code.co_filename:
        return
    error = unraisable.exc_value
    if (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
            and any(frame.name == "call_soon_threadsafe" for frame in traceback.extract_tb(unraisable.exc_traceback))):
        return
    sys.__unraisablehook__(unraisable)


class _DropAbandonedOrbaxReadLogs(logging.Filter):
    """A filter for the `asyncio` logger: the abandoned reads of a failed restore that had already started run as
    tasks or TensorStore futures, and asyncio logs each one's failure when it is collected ("Task / Future
    exception was never retrieved", a page of TensorStore spec; seen as a flaky extra output of `jaxchat eval` on
    a damaged checkpoint, docs/LOG.md, sessions 13 and 16). Such records that name an Orbax coroutine or carry a
    TensorStore error (its message holds the `tensorstore_spec`) are dropped, all others kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("never retrieved" in message and ("orbax" in message or "tensorstore_spec" in message))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Orbax logs a failed background save (and the asyncio teardown after it) as pages of tracebacks through
    # absl, and abandons the reads of a failed restore; jaxchat reports such failures itself, in one message
    # with the cause (checkpoint.py)
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    sys.unraisablehook = _drop_abandoned_orbax_reads
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _DropAbandonedOrbaxReadLogs) for f in asyncio_log.filters):
        asyncio_log.addFilter(_DropAbandonedOrbaxReadLogs())
    try:
        if args.cmd in ("train", "eval", "sample", "bench", "chat", "serve", "sft", "golf"):

            tune_cpu_runtime()  # on a CPU: the step reuses its memory (cpu_runtime.py)
            enable_compilation_cache()  # compiled steps are reused across runs (compilation.py)
        args.fn(args)
    except USER_ERRORS as e:
        print(f"jaxchat {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # (train says more: loop.Interrupted)
        print(f"jaxchat {args.cmd}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
