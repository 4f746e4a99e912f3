"""A whole training run: data, run directory, compile, the step loop, evaluation, checkpoints, a sample.

Wall time is accounted for in parts (compile, data, train steps, eval, checkpoint, sample, setup) that add up
to the total, and printed at the end with the final validation numbers.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxchat.checkpoint import Checkpointer, CheckpointError, load_run_config, write_json_atomic
from jaxchat.config import Config, ConfigError
from jaxchat.data import get_batch, prepare_dataset
from jaxchat.evaluate import compressor_bpb, eval_rows, evaluate, make_eval_step, target_bytes
from jaxchat.model.accounting import count, device_peak_flops, mfu
from jaxchat.plan import resolve
from jaxchat.sample import Sampler
from jaxchat.train import (ModelFns, NonFiniteError, Progress, abstract_state, batch_sharding, build_optimizer,
                           check_batch_fits, fmt_time, format_mfu, init_state, make_mesh, make_train_step,
                           shaped_batch)

DEFAULT_PROMPT = "def "


def cache_dir() -> Path:
    """Where prepared datasets live: $JAXCHAT_CACHE, else $XDG_CACHE_HOME/jaxchat, else ~/.cache/jaxchat."""
    if os.environ.get("JAXCHAT_CACHE"):
        return Path(os.environ["JAXCHAT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jaxchat"


def load_dataset(cfg: Config, log=print):
    return prepare_dataset(sequence_len=cfg.model.sequence_len, vocab_size=cfg.data.tokenizer_vocab,
                           cache_dir=cache_dir() / "data", max_train_chars=cfg.data.max_train_chars,
                           tokenizer_path=cfg.data.tokenizer_path, log=log)


def check_vocab(cfg: Config, tokenizer) -> None:
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size="
                          f"{cfg.model.vocab_size}: set --set model.vocab_size={tokenizer.vocab_size}")


def prepare_run_dir(run_dir: Path, resume: bool, force: bool) -> None:
    """Never destroys a run by accident: an existing run needs --resume (continue) or --force (start over)."""
    if resume:
        if not (run_dir / "config.json").is_file():
            raise CheckpointError(f"--resume: {run_dir} holds no run (no config.json); start it without --resume")
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        if not force:
            raise CheckpointError(f"run directory {run_dir} already exists: pass --resume to continue that run, "
                                  f"--force to delete it and start over, or choose another --run-dir")
        if not (run_dir / "config.json").is_file():
            raise CheckpointError(f"--force: {run_dir} is not empty and is not a jaxchat run (no config.json); "
                                  f"refusing to delete it. Choose another --run-dir.")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def check_resume_config(cfg: Config, saved: Config) -> None:
    diffs = [f"{sec}.{k}: run has {v!r}, now {getattr(getattr(cfg, sec), k)!r}"
             for sec in ("model", "optim", "data") for k, v in getattr(saved, sec).__dict__.items()
             if getattr(getattr(cfg, sec), k) != v]
    if diffs:
        raise ConfigError("--resume with a config that does not fit the run's checkpoint:\n  " + "\n  ".join(diffs)
                          + "\nFix: resume with the run's own config (omit --preset), or start a new run.")


def run_training(cfg: Config, run_dir: str | Path, resume: bool = False, force: bool = False,
                 prompt: str = DEFAULT_PROMPT, log=print) -> dict:
    t_start = time.perf_counter()
    timer = {"setup": 0.0, "data": 0.0, "compile": 0.0, "train": 0.0, "eval": 0.0, "checkpoint": 0.0, "sample": 0.0}
    run_dir = Path(run_dir)
    if resume:
        check_resume_config(cfg, load_run_config(run_dir))
    prepare_run_dir(run_dir, resume, force)

    t = time.perf_counter()
    ds = load_dataset(cfg, log)
    check_vocab(cfg, ds.tokenizer)
    timer["data"] += time.perf_counter() - t
    write_json_atomic(run_dir / "config.json", cfg.to_dict())
    ds.tokenizer.save(run_dir / "tokenizer.json")
    write_json_atomic(run_dir / "data.json", {k: v for k, v in ds.info.items() if k != "timings_s"})

    mesh = make_mesh()
    cfg = resolve(cfg, mesh.size)
    write_json_atomic(run_dir / "config.json", cfg.to_dict())  # the concrete config the run uses
    micro = check_batch_fits(cfg, mesh.size)
    sharding = batch_sharding(mesh)
    counts = count(cfg.model)
    peak = device_peak_flops()
    log(f"model: {counts.params['total']:,} params | {counts.flops['total'] / 1e6:,.1f} MFLOP/token | "
        f"{jax.devices()[0].device_kind} x{mesh.size} | batch {cfg.train.batch_size} x {cfg.model.sequence_len} "
        f"(micro {micro} x {cfg.train.grad_accum})")

    fns = ModelFns(cfg)
    optimizer = build_optimizer(cfg, None)
    ckpt = Checkpointer(run_dir, keep=2)
    if resume:
        state, meta = ckpt.restore(abstract_state(fns, optimizer))
        log(f"resumed {run_dir} at step {int(state['step'])}")
    else:
        state = init_state(fns, optimizer, cfg.train.init_seed)
    state = jax.device_put(state, NamedSharding(mesh, P()))  # params and moments replicated over the mesh
    start = int(state["step"])
    steps, B, T = cfg.train.num_steps, cfg.train.batch_size, cfg.model.sequence_len
    timer["setup"] += time.perf_counter() - t_start - timer["data"]

    def batch_at(step):
        x, y = get_batch(ds.train_rows, step, B, cfg.data.data_seed)
        return jax.device_put(shaped_batch(x, y, cfg.train.grad_accum), sharding)

    t = time.perf_counter()
    step_fn = make_train_step(fns, optimizer).lower(state, batch_at(start)).compile()
    eval_step = make_eval_step(fns, ds.tokenizer.token_bytes())
    timer["compile"] += time.perf_counter() - t
    val = eval_rows(ds.val_rows, micro, cfg.train.eval_tokens)
    metrics_path = run_dir / "metrics.jsonl"

    def log_metrics(rec):
        with open(metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def run_eval(step):
        t0 = time.perf_counter()
        out = evaluate(eval_step, state["params"], val, micro, NamedSharding(mesh, P("data", None)))
        timer["eval"] += time.perf_counter() - t0
        log_metrics({"step": step, **out})
        return out

    progress = Progress(steps, start, cfg.train.log_every)
    t_loop, before = time.perf_counter(), dict(timer)
    pending, t_last, last_eval = None, time.perf_counter(), None
    for step in range(start, steps):
        t0 = time.perf_counter()
        batch = batch_at(step)
        timer["data"] += time.perf_counter() - t0
        state, metrics = step_fn(state, batch)
        if pending is not None:  # fetch the previous step's metrics while this one runs
            report(pending, progress, log_metrics, cfg, counts, peak, mesh.size, t_last)
            t_last = time.perf_counter()
        pending = (step + 1, metrics)
        t0 = time.perf_counter()
        if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0 and step + 1 < steps:
            last_eval = run_eval(step + 1)
            progress.write(f"step {step + 1}: val loss {last_eval['val_loss']:.4f} | val bpb {last_eval['val_bpb']:.4f}")
        if cfg.train.save_every and (step + 1) % cfg.train.save_every == 0 and step + 1 < steps:
            t1 = time.perf_counter()
            ckpt.save(step + 1, state, {"config": cfg.to_dict()})
            timer["checkpoint"] += time.perf_counter() - t1
        t_last += time.perf_counter() - t0  # tokens/s counts training time only
    t_loop_end = time.perf_counter()
    if pending is not None:
        report(pending, progress, log_metrics, cfg, counts, peak, mesh.size, t_last)
    progress.close()
    timer["train"] = (t_loop_end - t_loop) - sum(timer[k] - before[k] for k in timer)

    final = run_eval(steps)
    t0 = time.perf_counter()
    ckpt.save(steps, state, {"config": cfg.to_dict()})
    ckpt.close()
    timer["checkpoint"] += time.perf_counter() - t0
    ref = compressor_bpb(target_bytes(ds.tokenizer, val))

    t0 = time.perf_counter()
    sample_ids = Sampler(fns).generate(state["params"], [ds.tokenizer.bos_id] + ds.tokenizer.encode(prompt),
                                       cfg.train.sample_tokens, temperature=0.8, top_k=50, seed=0)
    sample = prompt + ds.tokenizer.decode(sample_ids)
    timer["sample"] += time.perf_counter() - t0
    total = time.perf_counter() - t_start
    timer["other"] = max(0.0, total - sum(timer.values()))
    summary = {"step": steps, **final, **ref, "wall_s": round(total, 2),
               "time_s": {k: round(v, 2) for k, v in timer.items()}, "sample": sample,
               "params": counts.params["total"], "skipped_steps": int(state["skipped"])}
    write_json_atomic(run_dir / "summary.json", summary)
    log(f"\nval loss {final['val_loss']:.4f} | val bpb {final['val_bpb']:.4f} "
        f"(gzip -9: {ref['gzip_bpb']:.3f}, xz -9e: {ref['xz_bpb']:.3f} bits/byte on the same {final['val_bytes']:,} bytes)")
    log("time: " + " | ".join(f"{k} {fmt_time(v)}" for k, v in timer.items()) + f" | total {fmt_time(total)}")
    log(f"checkpoint: {ckpt.dir / str(steps)}")
    log(f"sample (temperature 0.8, top-k 50):\n{sample}")
    return summary


def report(pending, progress, log_metrics, cfg, counts, peak, n_dev, t_last):
    step, metrics = pending
    m = jax.device_get(metrics)
    if not m["finite"]:
        if cfg.train.nonfinite == "halt":
            raise NonFiniteError(f"step {step}: loss {float(m['loss'])} / grad norm {float(m['grad_norm'])} is not "
                                 f"finite; the update was discarded and nothing corrupt was saved. Lower optim.lr, "
                                 f"or set train.nonfinite=skip to skip such steps.")
    dt = max(time.perf_counter() - t_last, 1e-9)
    tps = cfg.train.batch_size * cfg.model.sequence_len / dt
    u = mfu(counts.flops["total"], tps, peak, n_dev)
    rec = {"step": step, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]), "tok_per_s": round(tps, 1),
           "skipped": int(m["skipped"])}
    if u is not None:
        rec["mfu"] = round(u, 4)
    log_metrics(rec)
    progress.update(step, f"loss {rec['loss']:.4f} | {tps:,.0f} tok/s | MFU {format_mfu(u)}")
    return rec


def load_run(run_dir: str | Path, step: int | None = None):
    """(cfg, fns, params, tokenizer, step) of a run directory's checkpoint, for eval and sample."""
    from jaxchat.data import Tokenizer

    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    fns = ModelFns(cfg)
    optimizer = build_optimizer(cfg, None)
    ckpt = Checkpointer(run_dir, async_save=False)
    state, _ = ckpt.restore(abstract_state(fns, optimizer), step)
    ckpt.close()
    tok_path = run_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise CheckpointError(f"{tok_path} is missing: copy the tokenizer the run trained with there")
    return cfg, fns, state["params"], Tokenizer.load(tok_path), int(state["step"])


__all__ = ["run_training", "load_run", "load_dataset", "cache_dir"]
