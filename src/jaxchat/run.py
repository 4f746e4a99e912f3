"""A Run: everything one command works with, built once, the same way for train, eval, sample, bench, dry-run and
export: the resolved config, the mesh, the model functions, the optimizer, the train state (or its shapes), the
checkpointer, the dataset, the clock and the log.

    Run.build(cfg)                       shapes only, nothing read or written (bench, --dry-run)
    Run.start(cfg, run_dir, resume, force)   a training run: checked, restored or created (train)
    Run.start(..., dataset=ds, init_params=f) the same, on a given dataset from given weights (jaxchat sft)
    Run.load(run_dir, step)              a run directory's checkpoint on one device (eval, sample, export)

Order of `Run.start` (so that a mistake costs nothing and destroys nothing):
1. every check that needs no data or disk writes: batch over devices, the forward traced on shapes (a backend
   this machine cannot run), run directory state (exists without --resume/--force), a tokenizer_path that does
   not exist or does not fit the model's vocab;
2. on --resume: lock the run (no second process on it), read the latest committed checkpoint's config and
   check it against this one, then restore it (a missing, damaged or mismatched checkpoint fails here);
3. the dataset (built or loaded from the cache); its tokenizer against the model and against the run's;
4. only then the run directory changes: a new run is marked and its config written first (rundir.py), so a run
   killed at any later moment can be resumed; --force clears an old run first; --resume repairs what a killed
   process left (resume.py).

Several processes (distributed.py) build the same Run: all of them check and restore; process 0 alone prepares
the dataset first, writes the run directory's own files and prints, with a barrier wherever another process
must not run ahead of it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxchat.averaging import Averaging, select_weights
from jaxchat.cache import cache_dir
from jaxchat.checkpoint import Checkpointer
from jaxchat.clock import Clock
from jaxchat.config import Config, ConfigError
from jaxchat.data import Tokenizer, check_manifest, load_for_training
from jaxchat.data.tokenizer import find_tokenizer_file
from jaxchat.distributed import is_primary, together
from jaxchat.environment import environment
from jaxchat.fileio import write_json_atomic
from jaxchat.optim import build_optimizer
from jaxchat.plan import resolve
from jaxchat.resume import check_resume_config, check_run_tokenizer, load_run_tokenizer, repair, restore_latest
from jaxchat.rundir import check_run_dir, load_run_config, lock_run_dir, start_run_dir
from jaxchat.trackers import Trackers, check_trackers
from jaxchat.train import (ModelFns, abstract_state, check_batch_fits, init_state, make_mesh, one_device, replicated,
                           state_from_params)


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
    p = (find_tokenizer_file(path) or Path(path) / "tokenizer.json") if Path(path).is_dir() else Path(path)
    if not p.is_file():
        what = "holds no tokenizer.json or tokenizer.model" if Path(path).is_dir() else "does not exist"
        raise ConfigError(f"data.tokenizer_path={path!r} {what}: point it at a HF tokenizer.json (e.g. "
                          f"runs/tiny/tokenizer.json) or a sentencepiece .model, or set data.tokenizer_path='' to "
                          f"train a BPE tokenizer of data.tokenizer_vocab tokens.")
    try:
        tok = Tokenizer.load(p)
    except ValueError as e:  # (Tokenizer.load turns the HF loader's bare Exceptions into ValueError)
        raise ConfigError(f"data.tokenizer_path={path!r} is not a readable tokenizer ({str(e)[:300]}): point "
                          f"it at a HF tokenizer.json or a sentencepiece .model, or set "
                          f"data.tokenizer_path=''.") from None
    check_vocab(cfg, tok, where=f"data.tokenizer_path={path!r}")


def _quiet(*args, **kwargs) -> None:
    """The log of a process other than 0: process 0 prints for the run."""


@dataclass
class Run:
    cfg: Config                     # resolved for this mesh (plan.py)
    mesh: Mesh
    micro: int                      # sequences per micro-batch, over the whole mesh
    fns: ModelFns
    optimizer: object               # optax.GradientTransformation
    abstract: dict                  # the train state's shapes, replicated over the mesh
    state: dict | None = None       # the train state (None: shapes only)
    run_dir: Path | None = None
    ckpt: Checkpointer | None = None
    ds: object = None               # data.Dataset (training) or None
    tokenizer: Tokenizer | None = None
    clock: Clock = field(default_factory=Clock)
    log: object = print
    primary: bool = True            # process 0 (writes the run's files and prints)
    proc: float = field(default_factory=lambda: round(time.time(), 3))  # this process's id in metrics records
    prior: dict = field(default_factory=dict)  # wall-time split of the run before this process (resume.py)
    history: dict = field(default_factory=lambda: {"restarts": 0, "lost_steps": 0})
    lock: int | None = None         # the run directory's lock (rundir.lock_run_dir), held until close()
    trackers: Trackers | None = None  # TensorBoard / W&B (trackers.py), opened by the loop
    averaging: Averaging | None = None  # EMA / SWA carried in the state (averaging.py), None when both are off
    dataset: object = None          # given instead of the config's data.source (fine-tuning: chat/sft.py)
    init_params: object = None      # () -> params that step 0 starts from, instead of the seeded init

    @classmethod
    def build(cls, cfg: Config, mesh: Mesh | None = None, log=print) -> "Run":
        """Config (resolved for the mesh), mesh, model functions, optimizer and state shapes (replicated over the
        mesh): nothing allocated, read or written."""
        mesh = mesh or make_mesh()
        cfg = resolve(cfg, mesh.size)
        micro = check_batch_fits(cfg, mesh.size)
        fns = ModelFns(cfg)
        optimizer = build_optimizer(cfg, None)
        averaging = Averaging.from_config(cfg)
        abstract = abstract_state(fns, optimizer, replicated(mesh), averaging)
        return cls(cfg, mesh, micro, fns, optimizer, abstract, log=log, averaging=averaging)

    def check_forward(self) -> None:
        """The forward traced on shapes, no compute: a backend this machine cannot run (splash off a TPU) or a
        shape it cannot take fails now, before anything is written."""
        x = jax.ShapeDtypeStruct((self.micro, self.cfg.model.sequence_len), jnp.int32)
        with jax.set_mesh(self.mesh):
            jax.eval_shape(lambda params, x: self.fns.module(params)(x, targets=x), self.abstract["params"], x)

    def init_state(self) -> dict:
        if self.init_params is not None:  # fine-tuning: the given weights and a fresh optimizer state
            return jax.jit(lambda p: state_from_params(p, self.optimizer, self.averaging),
                           out_shardings=replicated(self.mesh))(self.init_params())
        seed = self.cfg.train.init_seed
        return jax.jit(lambda: init_state(self.fns, self.optimizer, seed, self.averaging),
                       out_shardings=replicated(self.mesh))()

    @classmethod
    def start(cls, cfg: Config, run_dir: str | Path, resume: bool = False, force: bool = False, log=print,
              dataset=None, init_params=None) -> "Run":
        """A training run, checked, then restored (--resume) or created (module docstring: the order). Close it
        (`with run:`) to finish an in-flight save and release the run's lock. `dataset` (a data.Dataset) replaces
        the config's data.source, and `init_params` (a function returning params) the seeded initialisation."""
        primary = is_primary()
        run_dir = Path(run_dir)
        with together("checking the config and the run directory"):  # (every process looks before 0 writes)
            run = cls.build(cfg, log=log if primary else _quiet)
            run.run_dir, run.primary, run.dataset, run.init_params = run_dir, primary, dataset, init_params
            run.check_forward()
            check_run_dir(run_dir, resume, force)
            if resume:
                check_resume_config(run.cfg, load_run_config(run_dir), batch=False)  # (the checkpoint's: below)
            check_data_inputs(run.cfg)
            check_trackers(run.cfg)
        try:
            run._open(resume, force)
        except BaseException:
            run.close()
            raise
        return run

    def _open(self, resume: bool, force: bool) -> None:
        cfg, run_dir, clock, log = self.cfg, self.run_dir, self.clock, self.log
        # an existing run is locked from here on (no second job resumes or deletes it meanwhile)
        with together("locking the run directory"):
            self.lock = lock_run_dir(run_dir) if self.primary and run_dir.is_dir() else None
        meta = {}
        if resume:  # a missing, damaged or mismatched checkpoint fails here, before any work
            with together("restoring the checkpoint"), clock("checkpoint"):
                self.ckpt = Checkpointer(run_dir, keep_last=cfg.train.keep_last, keep_every=cfg.train.keep_every)
                self.state, meta = restore_latest(cfg, self.ckpt, self.abstract)
        with clock("data"):  # process 0 prepares the dataset; the others then find it in the cache
            with together("preparing the dataset"):
                ds = self.dataset or (load_dataset(cfg, log) if self.primary else None)
            with together("loading the dataset"):
                self.ds = ds or load_dataset(cfg, log)
                self.tokenizer = self.ds.tokenizer
                check_vocab(cfg, self.tokenizer)
                if resume:
                    check_run_tokenizer(run_dir, self.tokenizer)
                    check_manifest(run_dir, self.ds)  # the same dataset (and packing) as the run's data.json
        # only now, the run directory changes (process 0 alone writes; the others wait for it)
        if resume:
            step = int(self.state["step"]) if self.state is not None else 0
            self.prior, self.history = repair(run_dir, step, meta, self.ckpt, self.ds, log, write=self.primary)
            if self.primary:
                write_json_atomic(run_dir / "config.json", cfg.to_dict())  # the config the run goes on with
        else:
            with together("creating the run directory"):
                if self.primary:
                    start_run_dir(run_dir, force, "train", log)  # the marker, first
                    self.lock = self.lock if self.lock is not None else lock_run_dir(run_dir)
                    write_json_atomic(run_dir / "config.json", cfg.to_dict())
                    self.tokenizer.save(run_dir / self.tokenizer.file_name)  # (atomic; .json or .model)
                    write_json_atomic(run_dir / "data.json",
                                      {k: v for k, v in self.ds.info.items() if k != "timings_s"})
            self.ckpt = Checkpointer(run_dir, keep_last=cfg.train.keep_last, keep_every=cfg.train.keep_every)
        if self.primary:
            write_json_atomic(run_dir / "environment.json", environment())  # (this process's; a resume rewrites it)
        if self.state is None:  # a new run, or a resumed one that never committed a checkpoint
            self.state = self.init_state()

    @classmethod
    def load(cls, run_dir: str | Path, step: int | None = None, tokenizer: bool = True) -> "Run":
        """A run directory's checkpoint (default: the latest) onto one local device, whatever mesh the run was
        trained on (without a target sharding Orbax refuses a checkpoint saved on another topology), with its
        tokenizer unless `tokenizer` is False (export: an imported run may have none)."""
        run_dir = Path(run_dir)
        cfg = load_run_config(run_dir)  # (concrete already: resolving it for one device would change its batch)
        ckpt = Checkpointer(run_dir, async_save=False, read_only=True)
        try:
            step, _ = ckpt.read_meta(step)  # (a missing step fails first, then a missing or damaged tokenizer,
            tokenizer = load_run_tokenizer(run_dir) if tokenizer else None  # before any array is read)
            fns = ModelFns(cfg)
            optimizer = build_optimizer(cfg, None)
            averaging = Averaging.from_config(cfg)
            abstract = abstract_state(fns, optimizer, one_device(), averaging)
            state, _ = ckpt.restore(abstract, step)
        finally:
            ckpt.close()
        mesh = make_mesh(jax.devices()[:1])
        return cls(cfg, mesh, cfg.train.batch_size // cfg.train.grad_accum, fns, optimizer, abstract, state=state,
                   run_dir=run_dir, tokenizer=tokenizer, averaging=averaging)

    @property
    def params(self) -> dict:
        return self.state["params"]

    def weights(self, which: str = "raw") -> dict:
        """The params (raw), or their EMA or SWA average (averaging.py), with a clear error when the run has none."""
        return select_weights(self.state, which, f"{self.run_dir} step {int(self.state['step'])}")

    def close(self) -> None:
        """Finish the trackers and an in-flight save (of a good state, even when training failed) and release the
        run's lock."""
        try:
            if self.trackers is not None:
                self.trackers.finish({})  # (a no-op once the loop has finished them with the summary)
            if self.ckpt is not None:
                self.ckpt.close()
        finally:
            self.ckpt = None
            if self.lock is not None:
                os.close(self.lock)
                self.lock = None

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_run(run_dir: str | Path, step: int | None = None):
    """(cfg, fns, params, tokenizer, step) of a run directory's checkpoint: `Run.load`, unpacked."""
    run = Run.load(run_dir, step)
    return run.cfg, run.fns, run.params, run.tokenizer, int(run.state["step"])
