"""`jaxchat export RUN --format golf --out DIR` and `jaxchat eval --artifact FILE`: a run's checkpoint to a golf
artifact folder, and the artifact's bpb next to the unquantised model's (docs/golf.md §Artifact).

Export folder:
    model.golf        the artifact (golf/artifact.py): quantised, serialised, zstd-22 (or zlib-9) compressed
    accounting.json   model, code and total bytes against the 16,000,000 cap, the compressor, the scheme, the
                      tensors per kind, the code files counted, the source run, step and weights
    config.json       the run's full Config (the data section says which validation data eval --artifact uses)
    tokenizer.json    the run's tokenizer (bpb counts its bytes)
Nothing is written before the artifact is built and has passed the size check; each file is written atomically,
model.golf last, so a folder with model.golf is complete. An over-cap artifact is refused unless
--allow-over-cap, and then accounting.json says `fits: false`.
"""

from __future__ import annotations

import json
from pathlib import Path

from jaxchat.checkpoint import CheckpointError
from jaxchat.config import Config
from jaxchat.evaluate import eval_rows, evaluate, make_eval_step
from jaxchat.fileio import write_bytes_atomic, write_json_atomic
from jaxchat.golf.artifact import CAP_BYTES, Accounting, ArtifactError, build_artifact, read_artifact
from jaxchat.rundir import load_run_config

ARTIFACT = "model.golf"
ACCOUNTING = "accounting.json"
OWNED = (ARTIFACT, ACCOUNTING, "config.json", "tokenizer.json")


def check_out_dir(out: Path, force: bool, owned=OWNED, flag: str = "--out") -> None:
    """A file, or a non-empty directory without --force, is refused before any work; --force only replaces the
    files this command writes (`owned`), never deletes anything else."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{flag} {out} is a file, not a directory: choose a directory for the golf export")
    if out.exists() and any(out.iterdir()) and not force:
        raise CheckpointError(f"{flag} {out} exists and is not empty: choose another directory, or pass --force to "
                              f"replace {', '.join(owned)} there (nothing else is touched)")


def export_golf(run_dir, out, step: int | None = None, scheme: str = "int5", compressor: str = "auto",
                force: bool = False, allow_over_cap: bool = False, params=None, weights: str = "raw",
                run=None, cap: int = CAP_BYTES, log=print) -> tuple[Path, Accounting]:
    """Build the artifact of a run's checkpoint (or of `params`, the weights `weights` names; `run`: the
    already loaded Run) and write the export folder (module docstring). Returns (artifact path, accounting)."""
    from jaxchat.run import Run  # (the run machinery is not part of the artifact's code: artifact.py)
    run_dir, out = Path(run_dir), Path(out)
    check_out_dir(out, force)
    # (an imported run may have no tokenizer yet: the artifact does not need one, eval --artifact then needs --run)
    run = run or Run.load(run_dir, step, tokenizer=(run_dir / "tokenizer.json").is_file())
    step = int(run.state["step"])
    params = run.weights(weights) if params is None else params
    blob, acc, _ = build_artifact(params, run.cfg.model, scheme,
                                  source={"run": str(run_dir.absolute()), "step": step, "weights": weights},
                                  compressor=compressor, cap=cap)
    for note in acc.notes:
        log(f"note: {note}")
    if not acc.fits:
        if not allow_over_cap:
            raise ArtifactError(f"the golf artifact of {run_dir} step {step} is over the cap: {acc.line()}. Nothing "
                                f"was written. Shrink it (--quant int5, a smaller model) or pass --allow-over-cap "
                                f"to write it anyway (marked fits: false)")
        log(f"warning: writing an artifact OVER the {cap:,}-byte cap (--allow-over-cap)")
    out.mkdir(parents=True, exist_ok=True)
    (out / ARTIFACT).unlink(missing_ok=True)  # (--force: the old artifact goes first, so model.golf means complete)
    write_json_atomic(out / ACCOUNTING, {**acc.to_dict(), "source_run": str(run_dir.absolute()), "step": step,
                                         "weights": weights})
    write_json_atomic(out / "config.json", run.cfg.to_dict())
    if run.tokenizer is not None:
        run.tokenizer.save(out / "tokenizer.json")
    elif (out / "tokenizer.json").is_file():  # (--force over an older export: not this run's tokenizer)
        (out / "tokenizer.json").unlink()
    write_bytes_atomic(out / ARTIFACT, blob)
    log(f"golf artifact of {run_dir} step {step} ({weights} weights): {out / ARTIFACT}")
    log(acc.line())
    return out / ARTIFACT, acc


def _run_config_and_tokenizer(path: Path, run: str | None):
    """(Config, Tokenizer, where) for evaluating an artifact: --run's, else the export folder's."""
    from jaxchat.data import Tokenizer
    from jaxchat.resume import load_run_tokenizer
    if run is not None:
        return load_run_config(run), load_run_tokenizer(Path(run)), str(run)
    folder = path.parent
    if not (folder / "config.json").is_file() or not (folder / "tokenizer.json").is_file():
        raise ArtifactError(f"{folder} lacks the config.json and tokenizer.json `jaxchat export --format golf` writes "
                            f"beside {path.name}: pass --run RUN (the run it was exported from) for the validation "
                            f"data and tokenizer")
    try:
        cfg = Config.from_dict(json.loads((folder / "config.json").read_text()))
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise ArtifactError(f"{folder / 'config.json'} is not a jaxchat config ({e}): export the artifact again, or "
                            f"pass --run RUN") from None
    return cfg, Tokenizer.load(folder / "tokenizer.json"), str(folder)


def eval_artifact(path, run: str | None = None, tokens: int = 0, batch_size: int = 8, compare: bool = True,
                  log=print) -> dict:
    """Val loss and bpb of the artifact's (dequantised) model, and, when its source checkpoint can be read
    (--run, or the run recorded in the artifact), of the unquantised model on the same rows."""
    from jaxchat.run import Run, load_dataset
    from jaxchat.train import ModelFns
    path = Path(path)
    art = read_artifact(path)
    cfg, tok, where = _run_config_and_tokenizer(path, run)
    if cfg.model != art.cfg:
        raise ArtifactError(f"{path} holds a different model than {where}'s config (e.g. n_layer {art.cfg.n_layer} "
                            f"vs {cfg.model.n_layer}, n_embd {art.cfg.n_embd} vs {cfg.model.n_embd}): pass the run "
                            f"it was exported from")
    ds = load_dataset(cfg, log=lambda *a: None)
    rows = eval_rows(ds.val_rows, batch_size, tokens or cfg.train.eval_tokens)
    step_fn = make_eval_step(ModelFns(cfg), tok.byte_rule())
    out = {"artifact": str(path), "artifact_bytes": art.nbytes, "scheme": art.header["scheme"],
           "compressor": art.compressor, "source": art.header.get("source", {}),
           "post_quant": evaluate(step_fn, art.params, rows, batch_size)}
    src = art.header.get("source", {})
    src_run = run or src.get("run")
    if compare and src_run and Path(src_run, "config.json").is_file():
        try:
            source = Run.load(src_run, src.get("step"), tokenizer=False)
            unquantised = source.weights(src.get("weights", "raw"))
        except CheckpointError as e:
            log(f"(no unquantised comparison: {e})")
        else:
            out["pre_quant"] = evaluate(step_fn, unquantised, rows, batch_size)
    pq = out["post_quant"]
    line = (f"{path} ({out['scheme']}, {out['compressor']}, {art.nbytes:,} bytes): val loss {pq['val_loss']:.4f} | "
            f"val bpb {pq['val_bpb']:.4f}")
    if "pre_quant" in out:
        pre = out["pre_quant"]
        line += (f" | unquantised ({src_run} step {src.get('step')}, {src.get('weights', 'raw')} weights): val loss {pre['val_loss']:.4f} | val bpb "
                 f"{pre['val_bpb']:.4f} | quantisation costs {pq['val_bpb'] - pre['val_bpb']:+.4f} bpb")
    log(line + f" ({pq['val_tokens']:,} tokens, {pq['val_bytes']:,} bytes)")
    return out
