"""`jaxchat golf RUN --out DIR`, and the golf parts of `jaxchat export` (--format golf) and `jaxchat eval`
(--artifact): argparse wiring. cli.py and interop/commands.py register these."""

from __future__ import annotations

from jaxchat.argtypes import count_int, positive_int
from jaxchat.averaging import WEIGHTS
from jaxchat.golf.quant import MATRIX_SCHEMES
from jaxchat.golf.sliding import TAILS


def add_export_args(p) -> None:
    g = p.add_argument_group("--format golf (docs/golf.md)")
    g.add_argument("--quant", default="int5", choices=MATRIX_SCHEMES,
                   help="what MLP and attention matrices get: int5 (PR #334), int6, or int8 with the percentile "
                        "clip (the naive baseline); embeddings are int8, small tensors fp16/fp32 in every scheme")
    g.add_argument("--compressor", default="auto", choices=("auto", "zstd", "zlib"),
                   help="auto: zstd level 22 when `zstandard` is installed (pip install 'jaxchat[zstd]'), else "
                        "zlib level 9, said so in the output and accounting.json")
    g.add_argument("--allow-over-cap", action="store_true",
                   help="write the artifact even when model + code bytes exceed 16,000,000 (marked fits: false)")


def cmd_export_golf(args) -> None:
    from jaxchat.golf.export import export_golf
    export_golf(args.run, args.out, step=args.step, scheme=args.quant, compressor=args.compressor, force=args.force,
                allow_over_cap=args.allow_over_cap, weights=args.weights)


def add_eval_args(p) -> None:
    p.add_argument("--stride", type=positive_int, metavar="N",
                   help="golf's sliding-window eval: windows every N tokens, each scoring its last N targets "
                        "(golf: 64); printed next to plain chunks of the same tokens")
    p.add_argument("--context", type=positive_int, metavar="T",
                   help="--stride: window length in tokens (default: the model's sequence_len)")
    p.add_argument("--sliding-tail", choices=TAILS, default="reference",
                   help="--stride: the end-aligned last window scores its last N targets as PR #334 does "
                        "(reference; may re-score up to N-1) or only those not yet scored (once)")
    tt = p.add_argument_group("test-time training (with --stride; docs/golf-eval.md)")
    tt.add_argument("--ttt", choices=("score-first", "full"),
                    help="score-first: each chunk scored, then trained on (leaderboard-legal); full: PR #334's "
                         "training on the whole val stream before scoring it (NOT leaderboard-legal, said so)")
    tt.add_argument("--ttt-lr", type=float, default=0.002, help="SGD lr (cosine across chunks in score-first)")
    tt.add_argument("--ttt-momentum", type=float, default=0.9)
    tt.add_argument("--ttt-epochs", type=positive_int, default=3, help="passes over each chunk (full: the stream)")
    tt.add_argument("--ttt-chunk", type=positive_int, default=32768, metavar="TOKENS",
                    help="score-first: tokens per chunk, a multiple of --stride")
    tt.add_argument("--ttt-grad-clip", type=float, help="global-norm clip (default 1.0 score-first, 0 = none full)")
    tt.add_argument("--ttt-freeze-blocks", type=count_int, default=2,
                    help="the first N blocks stay frozen (embeddings, BigramHash and smear always are)")
    tt.add_argument("--ttt-batch", type=positive_int, help="sequences per SGD step (default 32 score-first, 1 full)")
    p.add_argument("--artifact", metavar="FILE", help="evaluate a golf artifact (model.golf) instead of a checkpoint, "
                   "next to its unquantised source when that can be read; data and tokenizer from --run, else "
                   "the export folder's config.json and tokenizer.json")


def cmd_eval_artifact(args) -> None:
    from jaxchat.golf.export import eval_artifact
    eval_artifact(args.artifact, run=args.run, tokens=args.tokens, batch_size=args.batch_size)


def eval_sliding(args, run, params, val_rows, note: str) -> None:
    """`jaxchat eval --stride N [--ttt MODE]`: the sliding-window score of `params`, before and after test-time
    training when --ttt is given."""
    from jaxchat.golf.sliding import eval_run_sliding
    from jaxchat.golf.ttt import LEGAL_NOTE, run_ttt, ttt_config
    if args.ttt:  # test-time training (golf/ttt.py), scored with the sliding window
        context = args.context or run.cfg.model.sequence_len
        out = run_ttt(args.ttt, run.fns, params, run.tokenizer.byte_rule(), val_rows, args.tokens or
                      run.cfg.train.eval_tokens, context, args.stride, ttt_config(args), args.batch_size,
                      args.sliding_tail)
        b, a = out["before"], out["after"]
        print(f"{args.run} step {int(run.state['step'])}{note}: {LEGAL_NOTE[out['legal']]}, sliding "
              f"window (context {context}, stride {args.stride}): val bpb {b['val_bpb']:.4f} before -> "
              f"{a['val_bpb']:.4f} after (val loss {b['val_loss']:.4f} -> {a['val_loss']:.4f}; "
              f"{a['val_tokens']:,} tokens)")
        return
    # golf's sliding-window score (golf/sliding.py), next to plain chunks of the same tokens
    context = args.context or run.cfg.model.sequence_len
    tokens = args.tokens or run.cfg.train.eval_tokens
    slide, chunks = eval_run_sliding(run.fns, params, run.tokenizer.byte_rule(), val_rows, tokens, context,
                                     args.stride, args.batch_size, args.sliding_tail)
    print(f"{args.run} step {int(run.state['step'])}{note}: sliding window (context {context}, stride {args.stride}, "
          f"{slide['windows']:,} windows): val loss {slide['val_loss']:.4f} | val bpb {slide['val_bpb']:.4f} | "
          f"chunks of {context} on the same tokens: val loss {chunks['val_loss']:.4f} | val bpb "
          f"{chunks['val_bpb']:.4f} ({slide['val_tokens']:,} tokens, {slide['val_bytes']:,} bytes)")


def cmd_golf(args) -> None:
    from jaxchat.golf.submission import make_submission
    from jaxchat.golf.ttt import TTTConfig
    ttt = None if args.ttt == "none" else TTTConfig(
        lr=args.ttt_lr, momentum=args.ttt_momentum, epochs=args.ttt_epochs, chunk_tokens=args.ttt_chunk,
        grad_clip=1.0 if args.ttt == "score-first" else 0.0, freeze_blocks=args.ttt_freeze_blocks,
        batch_size=32 if args.ttt == "score-first" else 1)
    make_submission(args.run, args.out, step=args.step, scheme=args.quant, compressor=args.compressor,
                    tokens=args.tokens, batch_size=args.batch_size, force=args.force,
                    allow_over_cap=args.allow_over_cap, weights=args.weights, stride=args.stride,
                    context=args.context, ttt_mode=args.ttt, ttt=ttt)


def add_parsers(sub) -> None:
    g = sub.add_parser("golf", help="a trained run to a parameter-golf submission folder: artifact, submission.json "
                       "(bpb before/after quantisation, bytes), train log, README")
    g.add_argument("run", metavar="RUN_DIR")
    g.add_argument("--out", required=True, metavar="DIR")
    g.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    g.add_argument("--tokens", type=count_int, default=0, help="validation tokens (default: the run's eval_tokens)")
    g.add_argument("--batch-size", type=positive_int, default=8)
    g.add_argument("--force", action="store_true", help="replace this command's files in a non-empty --out")
    g.add_argument("--weights", choices=("auto",) + WEIGHTS, default="auto",
                   help="auto: as PR #334, the SWA average if the run has one, else the EMA, else the trained "
                        "params (train.ema_decay, train.swa_lr_below)")
    g.add_argument("--stride", type=count_int, default=64,
                   help="sliding-window eval of the round-tripped model, windows every N tokens (golf: 64; 0: skip)")
    g.add_argument("--context", type=positive_int, help="sliding window length (default: the model's sequence_len)")
    g.add_argument("--ttt", choices=("score-first", "full", "none"), default="score-first",
                   help="test-time training of the round-tripped model, scored with the sliding window: score-first "
                        "(leaderboard-legal, golf's recipe), full (PR #334's, NOT leaderboard-legal: labelled so), none")
    g.add_argument("--ttt-chunk", type=positive_int, default=32768, metavar="TOKENS",
                   help="score-first chunk (a multiple of --stride; the last chunk is never trained on)")
    g.add_argument("--ttt-epochs", type=positive_int, default=3)
    g.add_argument("--ttt-lr", type=float, default=0.002)
    g.add_argument("--ttt-momentum", type=float, default=0.9)
    g.add_argument("--ttt-freeze-blocks", type=count_int, default=2)
    add_export_args(g)
    g.set_defaults(fn=cmd_golf)
