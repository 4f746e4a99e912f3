"""`jaxchat golf RUN --out DIR`: a trained run to a submission-like folder (docs/golf.md §Submission).

    model.golf, accounting.json, config.json, tokenizer.json    the export (golf/export.py)
    submission.json   what golf's records report: val loss and bpb before quantisation and after the round trip
                      (the artifact read back from disk and dequantised: the honest number), then of the
                      round-tripped model with the sliding window (golf/sliding.py) and after test-time training
                      (golf/ttt.py; score-first by default, `full` labelled NOT leaderboard-legal); model, code
                      and total bytes against the cap; parameters; steps; training wall time; which weights
                      (raw, EMA or SWA: averaging.py; by default PR #334's choice, SWA > EMA > raw)
    train_log.jsonl   the run's metrics.jsonl (every logged step and evaluation)
    train_summary.json  the run's summary.json, when training finished
    README.md         the same facts in words, and how to reproduce them

Pre- and post-quant are scored on the first val rows holding --tokens targets (default the run's eval_tokens),
sliding and TTT on the first --tokens targets of the val stream. A field is absent when jaxchat did not measure it
(--stride 0: no sliding; --ttt none: no TTT; no summary.json: no wall time).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from jaxchat.config import ConfigError
from jaxchat.evaluate import eval_rows, evaluate, make_eval_step
from jaxchat.fileio import write_bytes_atomic, write_json_atomic
from jaxchat.golf.artifact import read_artifact
from jaxchat.golf.export import OWNED as EXPORT_OWNED, check_out_dir, export_golf

OWNED = EXPORT_OWNED + ("submission.json", "train_log.jsonl", "train_summary.json", "README.md")


def auto_weights(state: dict) -> str:
    """PR #334's choice: the SWA average when it collected any step, else the EMA, else the trained params."""
    avg = state.get("avg", {})
    if "swa_sum" in avg and int(avg["swa_count"]) > 0:
        return "swa"
    return "ema" if "ema" in avg else "raw"


def make_submission(run_dir, out, step: int | None = None, scheme: str = "int5", compressor: str = "auto",
                    tokens: int = 0, batch_size: int = 8, force: bool = False, allow_over_cap: bool = False,
                    weights: str = "auto", stride: int = 64, context: int | None = None,
                    ttt_mode: str = "score-first", ttt=None, log=print) -> dict:
    """The submission folder (module docstring). `stride` 0 skips the sliding-window eval; `ttt_mode` 'none'
    skips test-time training (golf/ttt.py; `ttt` its TTTConfig), which is scored with the sliding window and
    so needs a stride. Sliding and TTT score the round-tripped model on the first `tokens` targets of the val
    stream (golf/sliding.py's val_stream); pre- and post-quant on the same number of val rows' targets."""
    from jaxchat.golf.sliding import check_window, eval_run_sliding
    from jaxchat.golf.ttt import LEGAL_NOTE, TTTConfig, run_ttt
    from jaxchat.run import Run, load_dataset
    run_dir, out = Path(run_dir), Path(out)
    check_out_dir(out, force, OWNED)
    if ttt_mode != "none" and not stride:
        raise ConfigError("--ttt is scored with the sliding window: give --stride N (golf: 64), or --ttt none")
    t0 = time.perf_counter()
    run = Run.load(run_dir, step)
    step = int(run.state["step"])
    context = context or run.cfg.model.sequence_len
    if stride:
        check_window(context, stride)
    if ttt_mode != "none":  # (bad TTT settings fail here, before anything is evaluated or written)
        (ttt or TTTConfig()).check(run.cfg.model.n_layer, stride)
    weights = auto_weights(run.state) if weights == "auto" else weights
    params = run.weights(weights)  # (a run without such weights fails here, before any work)
    ds = load_dataset(run.cfg, log=lambda *a: None)
    tokens = tokens or run.cfg.train.eval_tokens
    rows = eval_rows(ds.val_rows, batch_size, tokens)
    step_fn = make_eval_step(run.fns, run.tokenizer.byte_rule())
    log(f"{run_dir} step {step}, {weights} weights")

    if (out / "submission.json").is_file():  # (--force: the old one goes first, so submission.json means complete)
        (out / "submission.json").unlink()
    pre = evaluate(step_fn, params, rows, batch_size)
    log(f"pre-quant: val loss {pre['val_loss']:.4f} | val bpb {pre['val_bpb']:.4f} ({pre['val_tokens']:,} tokens)")
    path, acc = export_golf(run_dir, out, scheme=scheme, compressor=compressor, force=True,
                            allow_over_cap=allow_over_cap, params=params, weights=weights, run=run, log=log)
    art = read_artifact(path)  # (the file as written: what a grader would load)
    post = evaluate(step_fn, art.params, rows, batch_size)
    log(f"post-quant ({scheme}, round trip from {path.name}): val loss {post['val_loss']:.4f} | val bpb "
        f"{post['val_bpb']:.4f} ({post['val_bpb'] - pre['val_bpb']:+.4f})")

    measured = {}
    if stride:  # (the sliding score, and non-overlapping windows of `context` on the same stream for comparison)
        slide, chunks = eval_run_sliding(run.fns, art.params, run.tokenizer.byte_rule(), ds.val_rows, tokens,
                                         context, stride, batch_size)
        measured.update(val_loss_sliding=slide["val_loss"], val_bpb_sliding=slide["val_bpb"],
                        val_bpb_chunks=chunks["val_bpb"], sliding_context=context, sliding_stride=stride,
                        sliding_tokens=slide["val_tokens"])
        log(f"sliding window (round-tripped, context {context}, stride {stride}): val loss {slide['val_loss']:.4f} | "
            f"val bpb {slide['val_bpb']:.4f} | chunks of {context} on the same {slide['val_tokens']:,} tokens: val "
            f"bpb {chunks['val_bpb']:.4f}")
    if stride and ttt_mode != "none":
        res = run_ttt(ttt_mode, run.fns, art.params, run.tokenizer.byte_rule(), ds.val_rows, tokens, context,
                      stride, ttt or TTTConfig(), batch_size)
        after = res["after"]
        measured.update(val_loss_ttt=after["val_loss"], val_bpb_ttt=after["val_bpb"], ttt=ttt_mode,
                        ttt_legal=res["legal"], ttt_note=LEGAL_NOTE[res["legal"]],
                        ttt_config=asdict(ttt or TTTConfig()))
    if "val_bpb_ttt" in measured:
        log(f"{measured['ttt_note']}: val loss {measured['val_loss_ttt']:.4f} | val bpb {measured['val_bpb_ttt']:.4f}")

    summary_path = run_dir / "summary.json"
    train_summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    sub = {
        "run": str(run_dir.absolute()), "step": step, "steps": step, "weights": weights,
        "params": acc.params, "scheme": scheme, "compressor": acc.compressor,
        "val_loss_pre_quant": pre["val_loss"], "val_bpb_pre_quant": pre["val_bpb"],
        "val_loss_post_quant": post["val_loss"], "val_bpb_post_quant": post["val_bpb"],
        "eval_tokens": post["val_tokens"], "eval_bytes": post["val_bytes"],
        "model_bytes": acc.model_bytes, "code_bytes": acc.code_bytes, "total_bytes": acc.total_bytes,
        "cap_bytes": acc.cap_bytes, "fits": acc.fits, **measured,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "pipeline_s": round(time.perf_counter() - t0, 2),
    }
    if train_summary and "wall_s" in train_summary:
        sub["train_wall_s"] = train_summary["wall_s"]
    if (run_dir / "metrics.jsonl").is_file():
        write_bytes_atomic(out / "train_log.jsonl", (run_dir / "metrics.jsonl").read_bytes())
    if train_summary is not None:
        write_json_atomic(out / "train_summary.json", train_summary)
    write_bytes_atomic(out / "README.md", readme(sub, run.cfg).encode())
    write_json_atomic(out / "submission.json", sub)  # (last: a folder with submission.json is complete)
    log(f"submission: {out / 'submission.json'}")
    return sub


def readme(sub: dict, cfg) -> str:
    m = cfg.model
    rows = [("val bpb before quantisation", f"{sub['val_bpb_pre_quant']:.4f}"),
            (f"val bpb after {sub['scheme']} + {sub['compressor']} round trip", f"{sub['val_bpb_post_quant']:.4f}")]
    if "val_bpb_sliding" in sub:
        rows.append((f"val bpb, sliding window (context {sub['sliding_context']}, stride {sub['sliding_stride']})",
                     f"{sub['val_bpb_sliding']:.4f}"))
    if "val_bpb_ttt" in sub:
        rows.append((f"val bpb after {sub['ttt_note']}", f"{sub['val_bpb_ttt']:.4f}"))
    rows += [("model bytes (model.golf)", f"{sub['model_bytes']:,}"), ("code bytes", f"{sub['code_bytes']:,}"),
             ("total bytes", f"{sub['total_bytes']:,} of {sub['cap_bytes']:,} "
                             f"({'fits' if sub['fits'] else 'OVER THE CAP'})"),
             ("parameters", f"{sub['params']:,}"), ("steps", f"{sub['steps']:,}")]
    if "train_wall_s" in sub:
        rows.append(("training wall time", f"{sub['train_wall_s']:.1f} s"))
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""# jaxchat golf submission

Run `{sub['run']}`, step {sub['step']} ({sub['weights']} weights). Model: {m.n_layer} layers, C {m.n_embd},
{m.n_head} heads / {m.n_kv_head} kv, MLP {m.mlp_mult}x {m.mlp}, vocab {m.vocab_size}, seq {m.sequence_len}.
Every bpb is measured on the same {sub['eval_tokens']:,} validation tokens ({sub['eval_bytes']:,} bytes).

| | |
|---|---|
{table}

Code bytes are the jaxchat source files that loading and evaluating model.golf imports (listed in
accounting.json); third-party libraries are not counted. Reproduce:

    jaxchat golf {sub['run']} --out DIR --quant {sub['scheme']} --weights {sub['weights']}
    jaxchat eval --artifact DIR/model.golf
"""
