"""`jaxchat sft`: supervised fine-tuning of a pretrained run on conversations (nanochat's chat_sft recipe).

Recipe (nanochat scripts/chat_sft.py), as config changes to the pretrained run's own config:
- the same optimizer, every learning rate at 0.8 of its pretraining peak (`init_lr_frac`), no weight decay
  (pretraining ends with Muon's decay at zero), no warmup; Muon recipe: flat, then a linear warmdown over the
  last 50% to 0; AdamW: cosine from the start down to 0 (jaxchat's AdamW schedule is warmup + cosine);
- the pretraining batch (sequences x sequence_len, gradient accumulation) and context;
- one epoch over the training conversations (or --steps);
- conversations rendered with the loss on assistant tokens only (conversation.py), packed whole into rows by
  best fit with BOS padding, never split;
- a held-out split: every VAL_EVERY-th conversation of the data (or --val files), evaluated as the mean loss
  per trained token every train.eval_every steps and at the end.
Differences from nanochat: the optimizer state starts fresh (nanochat warm-starts Muon's momentum from the
pretraining checkpoint), Muon's momentum follows jaxchat's pretraining schedule, and training runs on one
device (no data parallelism: SFT is short).

Exact resume, as in pretraining: the batch of step s is a pure function of (data seed, s) (a seeded permutation
of the packed rows per epoch), so a checkpoint (params, optimizer state, step) is all a resumed run needs. The
run directory is a normal jaxchat run (config.json, tokenizer.json, checkpoints/, metrics.jsonl) plus sft.json,
so `jaxchat chat|serve|eval|sample --run OUT` read it.

The step is `jaxchat.train.make_train_step` and the evaluation `jaxchat.evaluate.make_eval_step`, unchanged.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import replace
from pathlib import Path

import jax
import numpy as np

from jaxchat.chat.conversation import inputs_targets, pack_conversations, read_conversations
from jaxchat.checkpoint import Checkpointer, CheckpointError
from jaxchat.config import Config, ConfigError
from jaxchat.evaluate import make_eval_step
from jaxchat.fileio import append_jsonl, write_json_atomic
from jaxchat.run import load_run
from jaxchat.optim.groups import ADAMW_BASE, MUON_BASE
from jaxchat.plan import resolve
from jaxchat.resume import load_run_tokenizer
from jaxchat.rundir import check_run_dir, load_run_config, lock_run_dir, start_run_dir
from jaxchat.optim import build_optimizer
from jaxchat.train import ModelFns, abstract_state, make_train_step, one_device, shaped_batch

INIT_LR_FRAC = 0.8  # nanochat's --init-lr-frac
WARMDOWN_RATIO = 0.5  # nanochat's --warmdown-ratio
VAL_EVERY = 20  # every 20th conversation is held out (5%), when no --val files are given


def sft_config(base: Config, steps: int, eval_every: int, save_every: int) -> Config:
    """The pretrained run's config with nanochat's SFT optimizer settings and the SFT horizon."""
    o = base.optim
    if o.optimizer == "adamw":
        optim = replace(o, lr=o.lr * INIT_LR_FRAC, weight_decay=0.0, warmup_steps=0, end_lr_frac=0.0)
    else:
        old = json.loads(o.groups or "{}")
        groups = {name: {**old.get(name, {}), "lr": old.get(name, {}).get("lr", base_hp["lr"]) * INIT_LR_FRAC,
                         "wd": 0.0}
                  for name, base_hp in {**ADAMW_BASE, "muon": MUON_BASE}.items()}
        groups.update(warmup_steps=0, warmdown_ratio=WARMDOWN_RATIO, final_lr_frac=0.0)
        optim = replace(o, groups=json.dumps({**old, **groups}))
    train = replace(base.train, num_steps=steps, eval_every=eval_every, save_every=save_every, keep_every=0,
                    ema_decay=0.0, swa_lr_below=0.0)  # (SFT's state keeps no EMA/SWA: averaging.py)
    return replace(base, optim=optim, train=train)


def split(convs: list, val_every: int = VAL_EVERY) -> tuple[list, list]:
    """(train, val): every val_every-th conversation held out (at least one, at most all but one)."""
    if len(convs) < 2:
        raise ConfigError(f"{len(convs)} conversation(s): SFT needs at least 2 (one is held out for evaluation)")
    val_idx = set(range(val_every - 1, len(convs), val_every)) or {len(convs) - 1}
    return [c for i, c in enumerate(convs) if i not in val_idx], [c for i, c in enumerate(convs) if i in val_idx]


def batch_indices(num_rows: int, step: int, batch: int, seed: int) -> np.ndarray:
    """The rows of step `step`: consecutive slices of a seeded permutation of the rows, a new one per epoch (a
    pure function of (seed, step), which is what makes resume exact)."""
    out = []
    for j in range(step * batch, (step + 1) * batch):
        epoch, k = divmod(j, num_rows)
        out.append(np.random.default_rng([seed, epoch]).permutation(num_rows)[k])
    return np.asarray(out)


def load_data(paths: list[str], val_paths: list[str], tok, row_len: int):
    """Packed (inputs, targets) for training and validation, and counts for sft.json."""
    convs = [c for p in paths for c in read_conversations(p, tok, row_len)]
    if val_paths:
        train, val = convs, [c for p in val_paths for c in read_conversations(p, tok, row_len)]
    else:
        train, val = split(convs)
    sets = {name: inputs_targets(*pack_conversations(c, row_len, tok.bos_id)) for name, c in
            (("train", train), ("val", val))}
    info = {"train_conversations": len(train), "val_conversations": len(val),
            "train_rows": len(sets["train"][0]), "val_rows": len(sets["val"][0]),
            "train_trained_tokens": int((sets["train"][1] >= 0).sum())}
    return sets["train"], sets["val"], info


def run_sft(from_run: str, data: list[str], out: str, *, val: list[str] = (), steps: int = 0, eval_every: int = 0,
            save_every: int = 0, resume: bool = False, force: bool = False, log=print) -> dict:
    out_dir = Path(out)
    if not resume and out_dir.resolve() == Path(from_run).resolve():
        raise ConfigError(f"--out {out} is the pretrained run itself: write the fine-tuned run to a new directory")
    check_run_dir(out_dir, resume, force, flag="--out")
    if resume:  # the run's own record of what it fine-tunes on; the command line may not change it
        record = _read_record(out_dir)
        from_run, data, val = record["from"], record["data"], record["val"]
        cfg = load_run_config(out_dir)
        tok = load_run_tokenizer(out_dir)
    else:
        base_cfg = load_run_config(from_run)
        tok = load_run_tokenizer(Path(from_run))
    row_len = (cfg if resume else base_cfg).model.sequence_len + 1
    (x, y), (vx, vy), info = load_data(list(data), list(val), tok, row_len)
    if not resume:
        batch = base_cfg.train.batch_size
        cfg = sft_config(base_cfg, steps or math.ceil(len(x) / batch), eval_every, save_every)
    cfg = resolve(cfg, 1)
    fns = ModelFns(cfg)
    optimizer = build_optimizer(cfg, None)
    lock = ckpt = None
    try:
        if resume:
            lock = lock_run_dir(out_dir)
            ckpt = Checkpointer(out_dir, keep_last=cfg.train.keep_last)
            state, _ = ckpt.restore(abstract_state(fns, optimizer, one_device()))
            log(f"resuming {out_dir} at step {int(state['step'])}")
            _drop_metrics_after(out_dir / "metrics.jsonl", int(state["step"]))
        else:
            _, _, params, _, from_step = load_run(from_run)
            state = {"params": params, "opt_state": optimizer.init(params), "step": jax.numpy.int32(0),
                     "skipped": jax.numpy.int32(0)}
            start_run_dir(out_dir, force, "sft", log, flag="--out")
            lock = lock_run_dir(out_dir)
            write_json_atomic(out_dir / "config.json", cfg.to_dict())
            tok.save(out_dir / "tokenizer.json")
            write_json_atomic(out_dir / "sft.json", {"from": str(from_run), "from_step": from_step,
                                                    "data": list(data), "val": list(val), **info})
            ckpt = Checkpointer(out_dir, keep_last=cfg.train.keep_last)
        return _train(cfg, fns, optimizer, state, ckpt, out_dir, (x, y), (vx, vy), info, log)
    finally:
        if ckpt is not None:
            ckpt.close()
        if lock is not None:
            os.close(lock)


def _read_record(out_dir: Path) -> dict:
    try:
        return json.loads((out_dir / "sft.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise CheckpointError(f"{out_dir}/sft.json is missing or damaged: --resume continues a run `jaxchat sft` "
                              f"made; start one with --from RUN --data FILE --out {out_dir}") from None


def _drop_metrics_after(path: Path, step: int) -> None:
    """Forget the records a killed process wrote after its last checkpoint: the resumed run writes them again."""
    if path.is_file():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(ln + "\n" for ln in lines))
        os.replace(tmp, path)


def _train(cfg, fns, optimizer, state, ckpt, out_dir, train, val, info, log) -> dict:
    t = cfg.train
    log(f"sft: {info['train_conversations']:,} conversations in {info['train_rows']:,} rows "
        f"({info['train_trained_tokens']:,} trained tokens), {info['val_conversations']:,} held out; "
        f"{t.num_steps} steps of {t.batch_size} x {cfg.model.sequence_len}")
    step_fn = make_train_step(fns, optimizer)
    eval_step = make_eval_step(fns, np.zeros(cfg.model.vocab_size, np.int32))  # (bytes unused: loss only)
    metrics_path = out_dir / "metrics.jsonl"

    def evaluate(step):
        nll = tokens = 0.0
        for i in range(0, len(val[0]), t.batch_size):
            o = jax.device_get(eval_step(state["params"], val[0][i:i + t.batch_size], val[1][i:i + t.batch_size]))
            nll, tokens = nll + float(o["nll"]), tokens + float(o["tokens"])
        rec = {"step": step, "val_loss": nll / max(tokens, 1), "val_tokens": int(tokens)}
        append_jsonl(metrics_path, [rec])
        log(f"step {step}: val loss {rec['val_loss']:.4f} ({rec['val_tokens']:,} tokens)")
        return rec

    def save(step):
        ckpt.save(step, state, {"config": cfg.to_dict(), "saved_at": time.time()})

    start = int(state["step"])
    if start >= t.num_steps:
        log(f"{out_dir} is complete: step {start} of {t.num_steps}")
        return {"step": start}
    if start == 0:
        evaluate(0)
    for step in range(start, t.num_steps):
        rows = batch_indices(len(train[0]), step, t.batch_size, cfg.data.data_seed)
        state, m = step_fn(state, shaped_batch(train[0][rows], train[1][rows], t.grad_accum))
        m = jax.device_get(m)
        if not m["finite"]:
            raise CheckpointError(f"step {step + 1}: the loss is not finite; the update was discarded. Resume from "
                                  f"the last checkpoint with a lower learning rate (optim.groups / optim.lr)")
        append_jsonl(metrics_path, [{"step": step + 1, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"])}])
        done = step + 1
        if done % t.log_every == 0 or done == t.num_steps:
            log(f"step {done}/{t.num_steps}: loss {float(m['loss']):.4f}")
        if t.eval_every and done % t.eval_every == 0 and done < t.num_steps:
            evaluate(done)
        if t.save_every and done % t.save_every == 0 and done < t.num_steps:
            save(done)
    final = evaluate(t.num_steps)
    if t.num_steps not in ckpt.all_steps():
        save(t.num_steps)
    ckpt.wait()
    log(f"checkpoint: {ckpt.dir / str(t.num_steps)}; chat with it: jaxchat chat --run {out_dir}")
    return final
