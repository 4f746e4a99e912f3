"""The training loop: a step, then the hooks that are due (hooks.py: report, evaluate, save), then the end of the
run (final evaluation and checkpoint, compressor baselines, a sample, summary.json).

Exact resume: a batch is a pure function of (data seed, step) and the train step has no other randomness, so
the state at step K (params, optimizer state, step, skip counter) is all a resumed run needs; evaluation and
sampling read the params and never touch training state. The loss of step s is written to metrics.jsonl before
the checkpoint of step s is saved, so a resumed run neither loses nor repeats a record.

Wall time is charged, moment by moment, to one part (clock.py), so the parts add up to the total; the totals are
cumulative over the processes of a resumed run (resume.py).
"""

from __future__ import annotations

import errno
import time
from pathlib import Path

import jax
import numpy as np

from jaxchat.checkpoint import CheckpointError
from jaxchat.config import Config, ConfigError
from jaxchat.cpu_runtime import synchronous_dispatch
from jaxchat.data import Prefetcher, get_batch
from jaxchat.display import Progress, fmt_time
from jaxchat.distributed import global_array, local_positions, over_processes
from jaxchat.evaluate import compressor_bpb, eval_rows, make_eval_step, target_bytes
from jaxchat.experiments.results import curve_summary, step_records
from jaxchat.fileio import write_json_atomic
from jaxchat.hooks import Evaluate, MetricsLog, Reporter, Save, due
from jaxchat.model.accounting import count, levanter_flops, run_flops
from jaxchat.model.gpt import resolved_kernels
from jaxchat.model.scan import describe as describe_layers
from jaxchat.peak import peak_flops
from jaxchat.profiling import ProfileWindow
from jaxchat.resume import continue_hint, out_of_memory_message
from jaxchat.run import Run
from jaxchat.sample import Sampler
from jaxchat.timecap import TimeCap
from jaxchat.trackers import Trackers
from jaxchat.train import batch_sharding, make_train_step, resolve_streams, shaped_batch, step_compiler_options

DEFAULT_PROMPT = "def "


class Interrupted(Exception):
    """Ctrl-C during a run: raised with the step inside the loop, then with the message that says how to
    continue."""

    def __init__(self, what):
        super().__init__(what)
        self.step = what if isinstance(what, int) else None


def run_training(cfg: Config, run_dir: str | Path, resume: bool = False, force: bool = False,
                 prompt: str = DEFAULT_PROMPT, log=print, peak_tflops: float | None = None,
                 profile: tuple[int, int] | None = None, **start) -> dict:
    """`jaxchat train`: build the run (run.py), train it, and turn what stops it into a message that says how
    to continue. `peak_tflops`: MFU's peak per device (default: peak.py); `profile` (A, B): trace steps A..B-1
    (profiling.py); `start` goes to Run.start (dataset, init_params: `jaxchat sft`)."""
    run_dir, run = Path(run_dir), None
    try:
        run = Run.start(cfg, run_dir, resume, force, log, **start)
        with jax.set_mesh(run.mesh):  # traced under the mesh: kernels without a partitioning rule shard_map over it
            return train(run, prompt, peak_tflops, profile)
    except (KeyboardInterrupt, Interrupted) as e:
        _close(run)  # (a save in flight commits first, so the hint names it)
        at = f" at step {e.step}" if getattr(e, "step", None) is not None else ""
        raise Interrupted(f"interrupted{at}; {continue_hint(run_dir)}") from None
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        _close(run)
        if run is None:  # (the state did not fit before the run was built)
            raise ConfigError(out_of_memory_message(cfg, cfg.train.batch_size // cfg.train.grad_accum, run_dir,
                                                    e)) from None
        raise ConfigError(out_of_memory_message(run.cfg, run.micro, run_dir, e)) from None
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EFBIG):
            raise
        _close(run)
        raise CheckpointError(f"could not write {e.filename or 'a file'}: {e.strerror}; "
                              f"{continue_hint(run_dir)}") from None
    finally:
        _close(run)


def _close(run: Run | None) -> None:
    if run is not None:
        try:
            run.close()
        except CheckpointError:  # the save in flight failed too: the error being raised says enough
            pass


def train(run: Run, prompt: str = DEFAULT_PROMPT, peak_tflops: float | None = None,
          profile: tuple[int, int] | None = None) -> dict:
    cfg, mesh, clock, state = run.cfg, run.mesh, run.clock, run.state
    counts, start, steps = count(cfg.model), int(state["step"]), cfg.train.num_steps
    window = ProfileWindow(profile, run.run_dir, start, steps, run.log) if profile else None
    B, T, A = cfg.train.batch_size, cfg.model.sequence_len, cfg.train.grad_accum
    _log_header(run, counts)

    sharding = batch_sharding(mesh)
    shape = (A, B // A, T)  # (accum, micro-batch, time), the micro-batch split over the mesh
    mine = local_positions(sharding, shape, axis=1)  # the rows of each micro-batch this process's devices hold
    positions = (np.arange(A)[:, None] * (B // A) + mine[None, :]).reshape(-1)  # ... as rows of the global batch

    def host_batch(step):  # on the prefetch thread; a pure function of (data seed, step)
        if step >= steps:
            return None
        x, y = get_batch(run.ds.train_rows, step, B, cfg.data.data_seed, positions=positions)
        return shaped_batch(x, y, A)

    with clock("compile"):
        batch_shape = jax.ShapeDtypeStruct(shape, jax.numpy.int32, sharding=sharding)
        step_fn = make_train_step(run.fns, run.optimizer, averaging=run.averaging)
        step_fn = step_fn.lower(state, (batch_shape, batch_shape)).compile()
        eval_step = make_eval_step(run.fns, run.tokenizer.byte_rule())
    val = eval_rows(run.ds.val_rows, run.micro, cfg.train.eval_tokens)
    run.trackers = Trackers(cfg, run.run_dir, run.primary)  # (finished by _finish, or by run.close() on an error)
    metrics = MetricsLog(run.run_dir, run.proc, run.primary, run.trackers)
    peak, peak_source = peak_flops(cfg.model.compute_dtype, peak_tflops, run.log)
    run.log(f"MFU against {peak / 1e12:,.3g} TFLOP/s per device ({peak_source})" if peak
            else f"MFU: n/a ({peak_source})")
    progress = Progress(steps, start, cfg.train.log_every, shown=run.primary)
    reporter = Reporter(run, counts, peak, metrics, progress, synchronous_dispatch())
    evaluate, save = Evaluate(run, eval_step, val, metrics, progress), Save(run)
    hooks = [evaluate, save]  # in this order: a step's evaluation is logged before its checkpoint is saved

    prefetch = Prefetcher(host_batch, start)  # batches are computed on a background thread, ahead of the step
    clock.switch("train")
    step, last = start, steps
    cap = TimeCap(run, save)
    try:
        for step in range(start, steps):
            if cap.reached(step):
                last = step
                break
            state = cap.set_lr(state, step)
            with clock("data"):  # the wait for the prefetched batch, and its copy to the devices
                batch = tuple(global_array(a, sharding, shape) for a in prefetch.get(step))
            if window:
                window.before(step + 1, step_fn)
            state, step_metrics = step_fn(state, batch)
            if window:
                window.after(step + 1, state)
            run.ckpt.poll()  # a background save that failed is reported now, with its step
            reporter.push(step + 1, step_metrics)
            now_due = [h for h in hooks if due(h, step + 1, steps)]
            if now_due:
                reporter.flush()  # log the step (and halt on a non-finite one) before evaluating or saving it
            for hook in now_due:
                hook(step + 1, state)
        reporter.flush()
    except KeyboardInterrupt:
        raise Interrupted(step) from None
    finally:
        prefetch.close()
        if window:
            window.stop()  # (a run stopped inside the window still leaves its trace)
    progress.close()
    clock.switch("other")
    run.state = state
    return _finish(run, state, evaluate, save, val, counts, prompt, last, peak)


def _log_header(run: Run, counts) -> None:
    cfg, m, mesh = run.cfg, run.cfg.model, run.mesh
    B, T, A = cfg.train.batch_size, m.sequence_len, cfg.train.grad_accum
    run.log(f"model: {counts.params['total']:,} params | {counts.flops['total'] / 1e6:,.1f} MFLOP/token | "
            f"{jax.devices()[0].device_kind} x{mesh.size}{over_processes()} | batch {B} x {T} "
            f"(micro {run.micro} x {A})")
    kernels = resolved_kernels(m, run.micro)
    attention = m.attention if kernels["attention"] == m.attention else f"{m.attention}->{kernels['attention']}"
    run.log(f"step: {m.compute_dtype} | attention {attention} | rope+qk-norm {kernels['rope_norm']} | "
            f"{describe_layers(m)} | remat {m.remat} | loss chunk {kernels['loss_chunk'] or 'off'} | "
            f"streams {resolve_streams(m.batch_streams, run.micro, T)}"
            + "".join(f" | xla {k}={v}" for k, v in step_compiler_options().items()))


def _finish(run: Run, state, evaluate: Evaluate, save: Save, val, counts, prompt: str, steps: int,
            peak: float | None) -> dict:
    """The last step's evaluation and checkpoint, the compressor baselines, a sample and summary.json (`steps`:
    the step reached, train.num_steps unless train.max_seconds stopped the run)."""
    cfg, clock, log, tok = run.cfg, run.clock, run.log, run.tokenizer
    final = evaluate.measure(steps, state)
    if steps not in run.ckpt.all_steps():
        save(steps, state)
    with clock("checkpoint"):
        run.ckpt.wait()  # the wait at exit for the last async save
    with clock("eval"):
        ref = compressor_bpb(target_bytes(tok, val))
    sample = prompt
    if cfg.train.sample_tokens > 0:  # (0: no sample, and no sampler to compile)
        with clock("sample"):
            prompt_ids = tok.encode(prompt)
            ids = Sampler(run.fns).generate(state["params"], [tok.bos_id] + prompt_ids,
                                            cfg.train.sample_tokens, temperature=0.8, top_k=50, seed=0)
            sample += tok.decode_after(prompt_ids, ids)  # (SentencePiece kind: keeps a first word's space)
    parts = save.totals()
    wall = sum(parts.values())
    history = run.history
    tokens = steps * cfg.train.batch_size * cfg.model.sequence_len
    summary = {"step": steps, **curve_summary(step_records(run.run_dir)), **final, **ref, "tokens": tokens,
               "model_flops": counts.flops["total"] * tokens, "wall_s": round(wall, 2),
               "train_s": round(parts["train"] + parts["data"], 2),
               "tokens_per_s": round(tokens / max(parts["train"] + parts["data"], 1e-9), 1),
               "time_s": {k: round(v, 2) for k, v in parts.items()},
               "process_wall_s": round(time.perf_counter() - clock.t0, 2), **history,
               "sample": sample, "params": counts.params["total"], "skipped_steps": int(state["skipped"]),
               # marin's accounting (model/accounting.py): Levanter's forward FLOPs, model = 3 x that x tokens,
               # hardware = the steps' time x chips x peak (the progress line's MFU peak: datasheet, --peak-tflops
               # or a CPU's measured matmul rate; null when unknown)
               "levanter_flops_per_token": levanter_flops(cfg.model)["total"],
               **run_flops(cfg.model, tokens, parts["train"], run.mesh.size, peak),
               "stopped_at_max_seconds": steps < cfg.train.num_steps}
    if run.primary:
        write_json_atomic(run.run_dir / "summary.json", summary)
    run.trackers.finish(summary)
    log(f"\nval loss {final['val_loss']:.4f} | val bpb {final['val_bpb']:.4f} (gzip -9: {ref['gzip_bpb']:.3f}, "
        f"xz -9e: {ref['xz_bpb']:.3f} bits/byte on the same {final['val_bytes']:,} bytes)")
    log("time: " + " | ".join(f"{k} {fmt_time(v)}" for k, v in parts.items()) + f" | total {fmt_time(wall)}"
        + (f" (over {history['restarts'] + 1} processes)" if history["restarts"] else ""))
    if summary["skipped_steps"]:
        log(f"skipped steps (non-finite loss or gradient): {summary['skipped_steps']}")
    log(f"checkpoint: {run.ckpt.dir / str(steps)}")
    if cfg.train.sample_tokens > 0:
        log(f"sample (temperature 0.8, top-k 50):\n{sample}")
    return summary
