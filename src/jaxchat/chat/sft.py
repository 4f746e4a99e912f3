"""`jaxchat sft`: supervised fine-tuning of a pretrained run on conversations (nanochat's chat_sft recipe), run by
the pretraining machinery: `loop.run_training` on a Run (run.py) given the packed conversations as its dataset
and the pretrained weights as its step 0. So checkpoints, `--resume` (bitwise exact), metrics.jsonl, the
non-finite policy, trackers, the progress line and summary.json are pretraining's own.

Recipe (nanochat scripts/chat_sft.py), as config changes to the pretrained run's own config (`sft_config`):
- the same optimizer, every learning rate at 0.8 of its pretraining peak (`--init-lr-frac`), no weight decay
  (pretraining ends with Muon's decay at zero), no warmup; Muon recipe: flat, then a linear warmdown over the
  last 50% to 0; AdamW: cosine from the start down to 0 (jaxchat's AdamW schedule is warmup + cosine);
- the pretraining batch (sequences x sequence_len, gradient accumulation) and context;
- one epoch over the training mixture (or --steps);
- conversations rendered with the loss on assistant tokens only (conversation.py), packed whole into rows by
  best fit with BOS padding, never split;
- a mixture of sources with weights (nanochat's TaskMixture repeats a task to weigh it: MMLU x3, GSM8K x4): a
  source `FILE:W` contributes round(W x its training conversations), whole copies first, then a seeded subset;
- a held-out split: every VAL_EVERY-th conversation of each source (or the --val files), unweighted, evaluated
  whole (every held-out row) as the mean loss per assistant token, before training, every train.eval_every
  steps and at the end.
Differences from nanochat: the optimizer state starts fresh (nanochat warm-starts Muon's momentum from the
pretraining checkpoint), Muon's momentum follows jaxchat's pretraining schedule, and there is no ChatCORE
evaluation during training (`jaxchat eval --chat` evaluates a finished run).

The loss mask rides in the rows (data/loader.py: an entry ~t is the input t and no target), so the loop, its
batches (a pure function of (data seed, step)) and its evaluation are unchanged. The run's data.json records
the base run, the sources and weights, the held-out split and dataset_id, a hash of the packed rows: `--resume`
rebuilds the rows from the recorded files and refuses to continue if they changed.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np

from jaxchat.chat.conversation import pack_conversations, read_conversations
from jaxchat.checkpoint import CheckpointError
from jaxchat.config import Config, ConfigError
from jaxchat.data.dataset import Dataset
from jaxchat.evaluate import evaluate, make_eval_step
from jaxchat.loop import run_training
from jaxchat.optim.groups import ADAMW_BASE, MUON_BASE
from jaxchat.resume import load_run_tokenizer
from jaxchat.run import Run, check_vocab
from jaxchat.rundir import check_run_dir, load_run_config

INIT_LR_FRAC = 0.8  # nanochat's --init-lr-frac
WARMDOWN_RATIO = 0.5  # nanochat's --warmdown-ratio
VAL_EVERY = 20  # every 20th conversation of a source is held out (5%), when no --val files are given
FORMAT = 1  # of the SFT rows: bump when rendering or packing changes what a recorded source gives


def sft_config(base: Config, steps: int, eval_every: int, save_every: int) -> Config:
    """The pretrained run's config with nanochat's SFT optimizer settings and the SFT horizon."""
    o = base.optim
    if o.optimizer not in ("adamw", "muon"):  # nanochat's SFT recipe is written for its own two optimizers
        raise ConfigError(f"the base run uses optim.optimizer={o.optimizer!r}: jaxchat sft applies nanochat's SFT "
                          f"recipe, written for adamw and muon; fine-tune a run trained with one of those")
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
                    ema_decay=0.0, swa_lr_below=0.0,  # (SFT's state keeps no EMA/SWA: averaging.py)
                    sample_tokens=0)  # (the loop's closing sample continues "def ", which means nothing to a chat)
    return replace(base, optim=optim, train=train)


def parse_source(text: str) -> tuple[str, float]:
    """`FILE` or `FILE:W` -> (FILE, W): W > 0 weighs the source in the mixture (default 1)."""
    m = re.fullmatch(r"(.+):([^:/\\]+)", text)
    if m is None or Path(text).exists():
        return text, 1.0
    try:
        weight = float(m.group(2))
    except ValueError:
        return text, 1.0  # (a path with a colon in its name)
    if not math.isfinite(weight) or weight <= 0:
        raise ConfigError(f"--data {text}: the weight {m.group(2)} must be a positive number (e.g. {m.group(1)}:2 "
                          f"counts each conversation twice, {m.group(1)}:0.5 half of them)")
    return m.group(1), weight


def split(convs: list, val_every: int = VAL_EVERY) -> tuple[list, list]:
    """(train, val): every val_every-th conversation held out (at least one, at most all but one)."""
    if len(convs) < 2:
        raise ConfigError(f"{len(convs)} conversation(s): SFT needs at least 2 (one is held out for evaluation)")
    val_idx = set(range(val_every - 1, len(convs), val_every)) or {len(convs) - 1}
    return [c for i, c in enumerate(convs) if i not in val_idx], [c for i, c in enumerate(convs) if i in val_idx]


def weigh(convs: list, weight: float, seed: int) -> list:
    """round(weight x len(convs)) conversations: whole copies of `convs`, then a seeded subset of them."""
    n = round(weight * len(convs))
    whole, rest = divmod(n, len(convs))
    pick = np.random.default_rng(seed).permutation(len(convs))[:rest]
    return convs * whole + [convs[i] for i in sorted(pick)]


def encode_rows(rows: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Packed rows with their loss mask folded in (data/loader.py): a token outside the mask becomes ~token."""
    return np.where(masks == 1, rows, ~rows).astype(np.int32)


def build_dataset(sources: list[str], val: list[str], tok, row_len: int, seed: int, batch: int,
                  record: dict | None = None) -> Dataset:
    """The SFT dataset: training mixture and held-out rows (mask folded in), the run's tokenizer, and an info
    record (data.json) naming the sources, weights and counts, and dataset_id, a hash of the rows."""
    train, held, counts = [], [], []
    for i, text in enumerate(sources):
        path, weight = parse_source(text)
        convs = read_conversations(path, tok, row_len)
        tr, va = (convs, []) if val else split(convs)
        weighted = weigh(tr, weight, seed + i)
        train += weighted
        held += va
        counts.append({"path": path, "weight": weight, "conversations": len(convs), "held_out": len(va),
                       "trained": len(weighted)})
    for path in val:
        held += read_conversations(path, tok, row_len)
    order = np.random.default_rng(seed).permutation(len(train))  # sources interleaved before packing
    train_rows = encode_rows(*pack_conversations([train[i] for i in order], row_len, tok.bos_id))
    val_rows = encode_rows(*pack_conversations(held, row_len, tok.bos_id))
    pad = -len(val_rows) % batch  # whole batches of held-out rows, so every one is evaluated; padding is all
    val_rows = np.concatenate([val_rows, np.full((pad, row_len), ~tok.bos_id, np.int32)])  # masked: no loss
    digest = hashlib.sha256(f"sft{FORMAT}".encode())
    for a in (train_rows, val_rows):
        digest.update(np.ascontiguousarray(a).tobytes())
    trained = int((train_rows[:, 1:] >= 0).sum())
    info = {**(record or {}), "source": "sft", "sources": counts, "val": list(val),
            "train_conversations": len(train), "val_conversations": len(held), "train_rows": len(train_rows),
            "val_rows": len(val_rows), "train_trained_tokens": trained,
            "val_trained_tokens": int((val_rows[:, 1:] >= 0).sum()), "dataset_id": "sft-" + digest.hexdigest()}
    return Dataset(tokenizer=tok, train_rows=train_rows, val_rows=val_rows, val_text="", info=info)


def run_sft(from_run: str, data: list[str], out: str, *, val: list[str] = (), steps: int = 0, eval_every: int = 0,
            save_every: int = 0, resume: bool = False, force: bool = False, log=print) -> dict:
    """Fine-tune `from_run` on the conversations of `data` into the new run `out` (or continue `out`)."""
    out_dir = Path(out)
    if not resume and out_dir.resolve() == Path(from_run).resolve():
        raise ConfigError(f"--out {out} is the pretrained run itself: write the fine-tuned run to a new directory")
    check_run_dir(out_dir, resume, force, flag="--out")
    if resume:  # the run's own record of what it fine-tunes on; the command line may not change it
        record = _read_record(out_dir)
        from_run, data, val = record["from"], [f"{s['path']}:{s['weight']}" for s in record["sources"]], record["val"]
        cfg, tok = load_run_config(out_dir), load_run_tokenizer(out_dir)
    else:
        cfg, tok = load_run_config(from_run), load_run_tokenizer(Path(from_run))
    check_vocab(cfg, tok)
    T, B = cfg.model.sequence_len, cfg.train.batch_size
    kept = {k: record[k] for k in ("from_step", "val_loss_before") if k in record} if resume else {}
    ds = build_dataset(list(data), list(val), tok, T + 1, cfg.data.data_seed, B, {"from": str(from_run), **kept})
    info = ds.info
    if resume and record.get("dataset_id") != info["dataset_id"]:
        files = ", ".join(s["path"] for s in record["sources"]) + "".join(f", {v}" for v in record["val"])
        raise CheckpointError(f"{out_dir} was fine-tuned on conversations that have changed since ({files}, as "
                              f"recorded in {out_dir}/data.json): its batches would differ from the ones the run "
                              f"saw. Restore those files to resume, or start over with --force")
    if not resume:
        cfg = sft_config(cfg, steps or math.ceil(info["train_rows"] / B), eval_every, save_every)
    cfg = replace(cfg, train=replace(cfg.train, eval_tokens=len(ds.val_rows) * T))  # every held-out row
    log(f"sft: {info['train_conversations']:,} conversations in {info['train_rows']:,} rows "
        f"({info['train_trained_tokens']:,} assistant tokens), {info['val_conversations']:,} held out; "
        f"{cfg.train.num_steps} steps of {B} x {T} from {from_run}")
    if not resume:
        base = Run.load(from_run)
        step = int(base.state["step"])
        before = evaluate(make_eval_step(base.fns, tok.token_bytes()), base.params, ds.val_rows, base.micro)
        ds.info = {**info, "from_step": step, "val_loss_before": before["val_loss"]}
        log(f"held-out loss per assistant token of {from_run} step {step}: {before['val_loss']:.4f}")
        params = base.params

        def init_params():
            return params
    else:  # (called only if the run never committed a checkpoint: it starts from step 0 again)
        def init_params():
            return Run.load(from_run, info.get("from_step")).params
    return run_training(cfg, out_dir, resume=resume, force=force, log=log, dataset=ds, init_params=init_params)


def _read_record(out_dir: Path) -> dict:
    try:
        record = json.loads((out_dir / "data.json").read_text())
    except (OSError, json.JSONDecodeError):
        record = {}
    if record.get("source") != "sft" or "sources" not in record:
        raise CheckpointError(f"{out_dir}/data.json is missing, damaged or not an SFT record: --resume continues a "
                              f"run `jaxchat sft` made; start one with --from RUN --data FILE --out {out_dir}")
    return record
