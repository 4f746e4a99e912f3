"""A whole training run: checks, data, run directory, compile, the step loop, evaluation, checkpoints, a sample.

Order of a run (so that a mistake costs nothing and destroys nothing):
1. every check that needs no data or disk writes: batch over devices, run directory state (exists without
   --resume/--force), a tokenizer_path that does not exist or does not fit the model's vocab;
2. on --resume: lock the run (no second process on it), read the latest committed checkpoint's config and
   check it against this one, then restore it (a missing, damaged or mismatched checkpoint fails here);
3. the dataset (built or loaded from the cache); its tokenizer against the model and against the run's;
4. only then the run directory changes: --force deletes the old run; --resume removes debris of interrupted
   saves and moves the metrics a killed process logged after its last checkpoint aside.

Exact resume: a batch is a pure function of (data seed, step) and the train step has no other randomness, so
the state at step K (params, optimizer state, step, skip counter) is all a resumed run needs; evaluation and
sampling read the params and never touch training state. The loss of step s is written to metrics.jsonl before
the checkpoint of step s is saved, so a resumed run neither loses nor repeats a record.

Several processes (distributed.py) run this same function: all of them check, restore, train, evaluate and
save (Orbax writes each checkpoint from all of them); process 0 alone prepares the dataset first, writes the
run directory's own files and prints, with a barrier wherever another process must not run ahead of it.

Wall time is charged, moment by moment, to one part (setup, data, compile, train, eval, checkpoint, sample,
restarts, other), so the parts add up to the total. The totals are cumulative over the processes of a run:
each checkpoint stores the split so far, and a resume adds the time the killed process spent after its last
checkpoint (from its metrics records) as `restarts`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from pathlib import Path

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxchat.checkpoint import Checkpointer, CheckpointError
from jaxchat.config import Config, ConfigError
from jaxchat.cpu_runtime import synchronous_dispatch
from jaxchat.data import Prefetcher, check_manifest, get_batch, load_for_training
from jaxchat.distributed import global_array, is_primary, local_positions, over_processes, together
from jaxchat.evaluate import compressor_bpb, eval_rows, evaluate, make_eval_step, target_bytes
from jaxchat.fileio import append_jsonl, read_jsonl, write_json_atomic
from jaxchat.model.accounting import count, device_peak_flops, mfu
from jaxchat.model.gpt import resolved_kernels
from jaxchat.model.scan import describe as describe_layers
from jaxchat.plan import resolve
from jaxchat.resume import check_resume_config, check_run_tokenizer, load_run_tokenizer, repair, restore_latest
from jaxchat.rundir import check_run_dir, is_marked, load_run_config, lock_run_dir, start_run_dir
from jaxchat.sample import Sampler
from jaxchat.train import (ModelFns, NonFiniteError, Progress, abstract_state, batch_sharding, build_optimizer,
                           check_batch_fits, fmt_time, format_mfu, init_state, make_mesh, make_train_step,
                           one_device, shaped_batch, step_compiler_options)

DEFAULT_PROMPT = "def "
PARTS = ("setup", "data", "compile", "train", "eval", "checkpoint", "sample", "restarts", "other")


class Clock:
    """Charges every moment of this process's wall time to exactly one part: `with clock("eval"): ...`."""

    def __init__(self, part: str = "setup"):
        self.parts = dict.fromkeys(PARTS, 0.0)
        self.t0 = self.mark = time.perf_counter()
        self.current = part

    def switch(self, part: str) -> str:
        now = time.perf_counter()
        self.parts[self.current] += now - self.mark
        self.mark, (prev, self.current) = now, (self.current, part)
        return prev

    @contextlib.contextmanager
    def __call__(self, part: str):
        prev = self.switch(part)
        try:
            yield
        finally:
            self.switch(prev)

    def read(self) -> dict:
        self.switch(self.current)
        return dict(self.parts)


def cache_dir() -> Path:
    """Where prepared datasets live: $JAXCHAT_CACHE, else $XDG_CACHE_HOME/jaxchat, else ~/.cache/jaxchat."""
    if os.environ.get("JAXCHAT_CACHE"):
        return Path(os.environ["JAXCHAT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jaxchat"


def load_dataset(cfg: Config, log=print):
    """The run's dataset: the stdlib corpus (built and cached) or a directory made by `jaxchat data prepare`."""
    return load_for_training(cfg.data, cfg.model.sequence_len, cache_dir() / "data", log=log)


def check_vocab(cfg: Config, tokenizer, where: str = "the tokenizer") -> None:
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"{where} has {tokenizer.vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}, "
                          f"so its top ids would have no embedding row: set --set model.vocab_size="
                          f"{tokenizer.vocab_size} (or larger), or use a tokenizer of at most {cfg.model.vocab_size} "
                          f"tokens.")


def check_data_inputs(cfg: Config) -> None:
    """A data.tokenizer_path that does not exist or does not fit the model fails here, before any work."""
    path = cfg.data.tokenizer_path
    if not path:
        return
    p = Path(path) / "tokenizer.json" if Path(path).is_dir() else Path(path)
    if not p.is_file():
        what = "holds no tokenizer.json" if Path(path).is_dir() else "does not exist"
        raise ConfigError(f"data.tokenizer_path={path!r} {what}: point it at a HF tokenizer.json (e.g. "
                          f"runs/tiny/tokenizer.json), or set data.tokenizer_path='' to train a BPE tokenizer of "
                          f"data.tokenizer_vocab tokens.")
    from jaxchat.data import Tokenizer
    try:
        tok = Tokenizer.load(p)
    except Exception as e:  # the HF loader raises plain Exceptions for malformed files
        raise ConfigError(f"data.tokenizer_path={path!r} is not a readable tokenizer.json ({type(e).__name__}: "
                          f"{str(e)[:200]}): point it at a HF tokenizer.json, or set data.tokenizer_path=''.") from None
    check_vocab(cfg, tok, where=f"data.tokenizer_path={path!r}")


class Interrupted(Exception):
    """Ctrl-C during a run: raised with the step inside the loop, then with the message that says how to
    continue."""

    def __init__(self, what):
        super().__init__(what)
        self.step = what if isinstance(what, int) else None


def run_training(cfg: Config, run_dir: str | Path, resume: bool = False, force: bool = False,
                 prompt: str = DEFAULT_PROMPT, log=print) -> dict:
    clock = Clock("setup")
    proc = round(time.time(), 3)  # this process's id in metrics records (its start time)
    run_dir = Path(run_dir)
    primary = is_primary()  # with several processes (distributed.py), process 0 writes the run's files and logs
    if not primary:
        log = _quiet

    # 1. checks that read nothing big and write nothing
    with together("checking the config and the run directory"):  # (every process looks before process 0 writes)
        mesh = make_mesh()
        cfg = resolve(cfg, mesh.size)
        micro = check_batch_fits(cfg, mesh.size)
        check_run_dir(run_dir, resume, force)
        if resume:
            check_resume_config(cfg, load_run_config(run_dir), batch=False)  # (the checkpoint's is checked below)
        check_data_inputs(cfg)

    fns = ModelFns(cfg)
    optimizer = build_optimizer(cfg, None)
    replicated = NamedSharding(mesh, P())  # params and moments replicated over the mesh
    abstract = abstract_state(fns, optimizer, replicated)
    with jax.set_mesh(mesh):  # the forward traced on shapes, no compute: a backend this machine cannot run (splash
        x = jax.ShapeDtypeStruct((micro, cfg.model.sequence_len), jax.numpy.int32)  # off TPU) fails before any write
        jax.eval_shape(lambda params, x: fns.module(params)(x, targets=x), abstract["params"], x)
    lock, ckpt, state = None, None, None
    try:
        # 2. an existing run is locked from here on (no second job resumes or deletes it meanwhile); --resume: the
        # checkpoint (a missing, damaged or mismatched one fails here, before any work)
        with together("locking the run directory"):
            lock = lock_run_dir(run_dir) if primary and run_dir.is_dir() else None
        if resume:
            with together("restoring the checkpoint"), clock("checkpoint"):
                ckpt = Checkpointer(run_dir, keep_last=cfg.train.keep_last, keep_every=cfg.train.keep_every)
                state, meta = restore_latest(cfg, ckpt, abstract)

        # 3. data (process 0 prepares it first; the others then find it in the cache)
        with clock("data"):
            with together("preparing the dataset"):
                ds = load_dataset(cfg, log) if primary else None
            with together("loading the dataset"):
                ds = ds or load_dataset(cfg, log)
                check_vocab(cfg, ds.tokenizer)
                if resume:
                    check_run_tokenizer(run_dir, ds.tokenizer)
                    check_manifest(run_dir, ds)  # the same dataset (and packing) as the run's data.json records

        # 4. only now, the run directory changes (process 0 alone writes; the others wait for it). A new run is
        # marked first, then its config is written, so a run killed at any later moment can be resumed.
        if resume:
            prior, history = repair(run_dir, int(state["step"]) if state else 0, meta, ckpt, ds, log,
                                    write=primary)
        else:
            with together("creating the run directory"):
                if primary:
                    start_run_dir(run_dir, force, "train", log)
                    if lock is None:
                        lock = lock_run_dir(run_dir)
                    write_json_atomic(run_dir / "config.json", cfg.to_dict())
                    ds.tokenizer.save(run_dir / "tokenizer.json")  # (atomic)
                    write_json_atomic(run_dir / "data.json", {k: v for k, v in ds.info.items() if k != "timings_s"})
            ckpt = Checkpointer(run_dir, keep_last=cfg.train.keep_last, keep_every=cfg.train.keep_every)
            prior, history = {}, {"restarts": 0, "lost_steps": 0}
        if state is None:  # a new run, or a resumed one that never committed a checkpoint
            state = jax.jit(lambda: init_state(fns, optimizer, cfg.train.init_seed), out_shardings=replicated)()
        if resume and primary:
            write_json_atomic(run_dir / "config.json", cfg.to_dict())  # the concrete config the run goes on with
        with jax.set_mesh(mesh):  # traced under the mesh: kernels without a partitioning rule shard_map over it
            return _train(cfg, run_dir, ds, fns, optimizer, state, ckpt, mesh, micro, clock, prior, history, proc,
                          prompt, log, primary)
    except (KeyboardInterrupt, Interrupted) as e:
        raise Interrupted(_stopped(run_dir, ckpt, getattr(e, "step", None), "interrupted")) from None
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        raise ConfigError(_out_of_memory(cfg, micro, run_dir, ckpt, e)) from None
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
            raise
        raise CheckpointError(_stopped(run_dir, ckpt, None, f"could not write {e.filename or 'a file'}: "
                                                             f"{e.strerror}")) from None
    finally:
        if ckpt is not None:
            ckpt.close()  # an in-flight save of a good state completes even when training failed
        if lock is not None:
            os.close(lock)


def _resume_hint(run_dir: Path, ckpt: Checkpointer | None) -> str:
    """What the run directory now holds and the command that continues it."""
    if not is_marked(run_dir):
        return "nothing was written; run the same command again"
    steps = ckpt.all_steps() if ckpt is not None else []
    at = f"from its latest checkpoint, step {steps[-1]}" if steps else "from step 0 (it has no checkpoint yet)"
    return f"`jaxchat train --run-dir {run_dir} --resume` continues it {at} with its recorded config"


def _stopped(run_dir: Path, ckpt: Checkpointer | None, step: int | None, what: str) -> str:
    if ckpt is not None:
        with contextlib.suppress(Exception):  # a save in flight commits first, so the hint names it
            ckpt.wait()
    at = f" at step {step}" if step is not None else ""
    return f"{what}{at}; {_resume_hint(run_dir, ckpt)}"


def _out_of_memory(cfg: Config, micro: int, run_dir: Path, ckpt: Checkpointer | None, e: Exception) -> str:
    B, A, T = cfg.train.batch_size, cfg.train.grad_accum, cfg.model.sequence_len
    first = str(e).strip().splitlines()[0][:200].rstrip(".")
    steps = ckpt.all_steps() if ckpt is not None else []
    if steps:
        fix = (f"resume with the same batch in smaller pieces: `jaxchat train --run-dir {run_dir} --resume --set "
               f"train.grad_accum={2 * A}` (continues from step {steps[-1]})")
    else:
        fix = (f"rerun with a smaller batch: `jaxchat train --run-dir {run_dir} --resume --set "
               f"train.batch_size={max(B // 2, 1)}` (the run has no checkpoint yet, so it starts from step 0 with its "
               f"recorded config and the new batch), or --set train.grad_accum={2 * A} to keep the batch")
    return (f"out of memory running the train step (batch {B} x {T}, micro-batch {micro} per step over "
            f"{jax.device_count()} {jax.devices()[0].device_kind} device(s)): {first}. Fix: {fix}; "
            f"`jaxchat train --dry-run` finds the largest batch that fits.")


def _quiet(*args, **kwargs) -> None:
    """The log of a process other than 0: process 0 prints for the run."""


def _train(cfg, run_dir, ds, fns, optimizer, state, ckpt, mesh, micro, clock, prior, history, proc, prompt, log,
           primary=True):
    sharding = batch_sharding(mesh)
    counts = count(cfg.model)
    peak = device_peak_flops()
    start = int(state["step"])
    steps, B, T, A = cfg.train.num_steps, cfg.train.batch_size, cfg.model.sequence_len, cfg.train.grad_accum
    log(f"model: {counts.params['total']:,} params | {counts.flops['total'] / 1e6:,.1f} MFLOP/token | "
        f"{jax.devices()[0].device_kind} x{mesh.size}{over_processes()} | batch {B} x {T} (micro {micro} x {A})")
    m = cfg.model
    run = resolved_kernels(m, micro)
    attention = m.attention if run["attention"] == m.attention else f"{m.attention}->{run['attention']}"
    log(f"step: {m.compute_dtype} | attention {attention} | rope+qk-norm {run['rope_norm']} | {describe_layers(m)} | "
        f"remat {m.remat} | loss chunk {m.loss_chunk or 'off'}"
        + "".join(f" | xla {k}={v}" for k, v in step_compiler_options().items()))

    shape = (A, B // A, T)  # (accum, micro-batch, time), the micro-batch split over the mesh
    mine = local_positions(sharding, shape, axis=1)  # the rows of each micro-batch this process's devices hold
    positions = (np.arange(A)[:, None] * (B // A) + mine[None, :]).reshape(-1)  # ... as rows of the global batch

    def host_batch(step):  # on the prefetch thread; a pure function of (data seed, step)
        if step >= steps:
            return None
        x, y = get_batch(ds.train_rows, step, B, cfg.data.data_seed, positions=positions)
        return shaped_batch(x, y, A)

    with clock("compile"):
        batch_shape = jax.ShapeDtypeStruct(shape, jax.numpy.int32, sharding=sharding)
        step_fn = make_train_step(fns, optimizer).lower(state, (batch_shape, batch_shape)).compile()
        eval_step = make_eval_step(fns, ds.tokenizer.token_bytes())
    val = eval_rows(ds.val_rows, micro, cfg.train.eval_tokens)
    metrics_path = run_dir / "metrics.jsonl"

    def log_metrics(rec):
        if primary:
            append_jsonl(metrics_path, [{**rec, "time": round(time.time(), 3), "proc": proc}])

    logged_evals = {r["step"] for r in read_jsonl(metrics_path)[0] if "val_loss" in r}  # (a resumed run's)

    def run_eval(step):
        with clock("eval"):
            out = evaluate(eval_step, state["params"], val, micro, NamedSharding(mesh, P("data", None)))
        if step not in logged_evals:
            log_metrics({"step": step, **out})
        return out

    def totals() -> dict:  # the run's cumulative split so far
        now = clock.read()
        return {k: prior.get(k, 0.0) + now[k] for k in PARTS}

    def save(step):
        with clock("checkpoint"):
            ckpt.save(step, state, {"config": cfg.to_dict(), "time_s": totals(), "saved_at": time.time(),
                                    "proc": proc})

    progress = Progress(steps, start, cfg.train.log_every, shown=primary)
    reporter = Reporter(cfg, counts, peak, mesh.size, clock, log_metrics, progress)

    pending = None
    synchronous = synchronous_dispatch()  # (cpu_runtime.py)
    prefetch = Prefetcher(host_batch, start)  # batches are computed on a background thread, ahead of the step
    clock.switch("train")
    step = start
    try:
        for step in range(start, steps):
            with clock("data"):  # the wait for the prefetched batch, and its copy to the devices
                batch = tuple(global_array(a, sharding, shape) for a in prefetch.get(step))
            state, metrics = step_fn(state, batch)
            ckpt.poll()  # a background save that failed is reported now, with its step
            if pending is not None:  # fetch the previous step's metrics while this one runs
                reporter(*pending)
            pending = (step + 1, metrics)
            if synchronous:  # this step has already run: log it now, so its time is its own
                reporter(*pending)
                pending = None
            done = step + 1
            eval_due = cfg.train.eval_every and done % cfg.train.eval_every == 0 and done < steps
            save_due = cfg.train.save_every and done % cfg.train.save_every == 0 and done < steps
            if (eval_due or save_due) and pending is not None:
                reporter(*pending)  # log step `done` (and halt on a non-finite one) before evaluating/saving it
                pending = None
            if eval_due:
                ev = run_eval(done)
                progress.write(f"step {done}: val loss {ev['val_loss']:.4f} | val bpb {ev['val_bpb']:.4f}")
            if save_due:
                save(done)
        if pending is not None:
            reporter(*pending)
    except KeyboardInterrupt:
        raise Interrupted(step) from None
    finally:
        prefetch.close()
    progress.close()
    clock.switch("other")

    final = run_eval(steps)
    if steps not in ckpt.all_steps():
        save(steps)
    with clock("checkpoint"):
        ckpt.wait()  # the wait at exit for the last async save
    with clock("eval"):
        ref = compressor_bpb(target_bytes(ds.tokenizer, val))
    sample = prompt
    if cfg.train.sample_tokens > 0:  # (0: no sample, and no sampler to compile)
        with clock("sample"):
            ids = Sampler(fns).generate(state["params"], [ds.tokenizer.bos_id] + ds.tokenizer.encode(prompt),
                                        cfg.train.sample_tokens, temperature=0.8, top_k=50, seed=0)
            sample += ds.tokenizer.decode(ids)
    parts = totals()
    wall = sum(parts.values())
    summary = {"step": steps, **final, **ref, "wall_s": round(wall, 2),
               "time_s": {k: round(v, 2) for k, v in parts.items()},
               "process_wall_s": round(time.perf_counter() - clock.t0, 2), **history,
               "sample": sample, "params": counts.params["total"], "skipped_steps": int(state["skipped"])}
    if primary:
        write_json_atomic(run_dir / "summary.json", summary)
    log(f"\nval loss {final['val_loss']:.4f} | val bpb {final['val_bpb']:.4f} "
        f"(gzip -9: {ref['gzip_bpb']:.3f}, xz -9e: {ref['xz_bpb']:.3f} bits/byte on the same {final['val_bytes']:,} bytes)")
    log("time: " + " | ".join(f"{k} {fmt_time(v)}" for k, v in parts.items()) + f" | total {fmt_time(wall)}"
        + (f" (over {history['restarts'] + 1} processes)" if history["restarts"] else ""))
    if summary["skipped_steps"]:
        log(f"skipped steps (non-finite loss or gradient): {summary['skipped_steps']}")
    log(f"checkpoint: {ckpt.dir / str(steps)}")
    log(f"sample (temperature 0.8, top-k 50):\n{sample}")
    return summary


class Reporter:
    """Fetches a step's metrics, applies the non-finite policy and logs the record. Tokens/s counts the data and
    train time since the previous record."""

    def __init__(self, cfg, counts, peak, n_dev, clock, log_metrics, progress):
        self.cfg, self.counts, self.peak, self.n_dev = cfg, counts, peak, n_dev
        self.clock, self.log_metrics, self.progress = clock, log_metrics, progress
        self.busy = self._busy()

    def _busy(self) -> float:
        p = self.clock.read()
        return p["train"] + p["data"]

    def __call__(self, step, metrics):
        m = jax.device_get(metrics)
        busy = self._busy()
        dt, self.busy = max(busy - self.busy, 1e-9), busy
        cfg = self.cfg
        tps = cfg.train.batch_size * cfg.model.sequence_len / dt
        u = mfu(self.counts.flops["total"], tps, self.peak, self.n_dev)
        rec = {"step": step, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
               "tok_per_s": round(tps, 1), "skipped": int(m["skipped"])}
        if u is not None:
            rec["mfu"] = round(u, 4)
        self.log_metrics(rec)
        if not m["finite"]:
            if cfg.train.nonfinite == "halt":
                raise NonFiniteError(
                    f"step {step}: loss {rec['loss']} / grad norm {rec['grad_norm']} is not finite; the update was "
                    f"discarded and training halted, so every checkpoint on disk holds finite values (the latest "
                    f"is the one to resume from). Lower optim.lr or check the data, or set train.nonfinite=skip to "
                    f"skip such steps.")
            self.progress.write(f"step {step}: non-finite loss or gradient; update skipped "
                                f"({rec['skipped']} skipped so far)")
        self.progress.update(step, f"loss {rec['loss']:.4f} | {tps:,.0f} tok/s | MFU {format_mfu(u)}")
        return rec


def load_run(run_dir: str | Path, step: int | None = None):
    """(cfg, fns, params, tokenizer, step) of a run directory's checkpoint, for eval and sample."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    ckpt = Checkpointer(run_dir, async_save=False, read_only=True)
    try:
        step, _ = ckpt.read_meta(step)  # (a missing step fails first, then a missing or damaged tokenizer,
        tokenizer = load_run_tokenizer(run_dir)  # before any array is read)
        fns = ModelFns(cfg)
        # onto one local device, whatever mesh the run was trained on: without a target sharding Orbax refuses a
        # checkpoint saved on another topology (e.g. trained on 8 devices, evaluated on 1)
        state, _ = ckpt.restore(abstract_state(fns, build_optimizer(cfg, None), one_device()), step)
    finally:
        ckpt.close()
    return cfg, fns, state["params"], tokenizer, int(state["step"])


__all__ = ["run_training", "load_run", "load_dataset", "cache_dir", "Clock", "Interrupted", "check_data_inputs"]
