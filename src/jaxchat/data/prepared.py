"""
Training on a dataset: the stdlib corpus or a directory made by `jaxchat data prepare`.

- load_for_training(data_cfg, sequence_len, cache_dir): the Dataset the loop trains on. data.source "stdlib"
  goes through prepare_dataset (cached); anything else is a prepared directory, whose packed rows for this
  sequence length are memory-mapped (packed on first use if `--seq` was not given to prepare: into the
  directory, or into cache_dir when the directory is read-only).
- check_manifest(run_dir, dataset): the run directory's data.json records the dataset a run trained on
  (`dataset_id`, `rows_id`); resuming against another one is refused, since its batches would differ.
- verify(dir): every shard's and rows file's checksum against the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from .dataset import Dataset, prepare_dataset
from .packing import PACK_BUFFER
from .prepare import pack, pack_signature, read_pack_info, rows_dir_name
from .shards import DataError, file_sha256, iter_shard_documents, read_header, read_rows
from .tokenizer import Tokenizer, find_tokenizer_file


class PreparedDataset(Dataset):
    """A Dataset over a prepared directory. val_text (the validation documents) is decoded from the val
    shards on first use only, since a val split can be large and training never needs it."""

    def __init__(self, tokenizer, train_rows, val_rows, info, val_shards, bos_id):
        self._val_shards, self._bos_id, self._val_text = val_shards, bos_id, None
        super().__init__(tokenizer, train_rows, val_rows, None, info)

    @property
    def val_text(self) -> str:
        if self._val_text is None:
            docs = [d.tolist() for d in iter_shard_documents(self._val_shards, self._bos_id)]
            self._val_text = "".join(self.tokenizer.decode_batch(docs))
        return self._val_text

    @val_text.setter
    def val_text(self, value):
        self._val_text = value

    def __repr__(self) -> str:
        return (f"PreparedDataset({self.info['dataset_dir']}, train_rows={self.train_rows.shape}, "
                f"val_rows={self.val_rows.shape})")


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a prepared directory, or a clear error saying what to run."""
    path = Path(path)
    if (path / "progress.json").is_file() and not (path / "manifest.json").is_file():
        raise DataError(f"{path} is an interrupted `jaxchat data prepare`: run the same command again to finish it")
    if not (path / "manifest.json").is_file():
        what = "does not exist" if not path.exists() else "holds no manifest.json"
        raise DataError(f"{str(path)!r} {what}: a prepared dataset is a directory made by `jaxchat data prepare "
                        f"SOURCE --tokenizer tokenizer.json --out DIR` (data.source is 'stdlib' or such a directory)")
    manifest = json.loads((path / "manifest.json").read_text())
    if manifest.get("format") != "jaxchat-dataset":
        raise DataError(f"{path}/manifest.json is not a jaxchat dataset manifest")
    return manifest


def _rows_id(sig: dict) -> str:
    return hashlib.sha256(json.dumps(sig, sort_keys=True).encode()).hexdigest()


def load_prepared(path: str | os.PathLike, sequence_len: int, cache_dir: str | os.PathLike | None = None,
                  tokenizer_path: str = "", split_long: bool = True, pack_buffer: int = PACK_BUFFER,
                  log=print) -> PreparedDataset:
    """Memory-map the rows of seq+1 tokens of a prepared directory, packing them first if needed."""
    path = Path(path)
    manifest = read_manifest(path)
    tok_file = find_tokenizer_file(path)
    if tok_file is None:
        raise DataError(f"{path} holds no tokenizer.json or tokenizer.model: copy the tokenizer the shards were made "
                        f"with there, or prepare the dataset again")
    tok = Tokenizer.load(tok_file)
    if tok.fingerprint() != manifest["params"]["tokenizer_sha256"]:
        raise DataError(f"{tok_file} is not the tokenizer the shards were made with (sha256 differs from "
                        f"the manifest's); restore it or prepare the dataset again")
    if tokenizer_path and Tokenizer.load(tokenizer_path).fingerprint() != tok.fingerprint():
        raise DataError(f"data.tokenizer_path={tokenizer_path!r} differs from the tokenizer of the prepared dataset "
                        f"{path}: set data.tokenizer_path='' (the dataset's own is used) or prepare the data with it")
    sig = pack_signature(manifest, sequence_len, split_long, pack_buffer)
    name = rows_dir_name(sequence_len, split_long, pack_buffer)
    candidates = [path / name]
    if cache_dir is not None:
        candidates.append(Path(cache_dir) / "packed" / f"{manifest['dataset_id'][:16]}-{name}")
    info = None
    for rows_dir in candidates:
        info = read_pack_info(rows_dir, sig)
        if info is not None:
            break
    if info is None:
        log(f"data: packing {path} into rows of {sequence_len + 1} tokens (once; `jaxchat data prepare --seq "
            f"{sequence_len}` does it ahead of time)")
        for rows_dir in candidates:
            try:
                info = pack(path, manifest, sequence_len, rows_dir, split_long, pack_buffer, log)
                break
            except OSError as e:  # read-only directory or file system
                log(f"data: cannot write {rows_dir} ({e}); trying the cache")
        else:
            where = " or the cache" if cache_dir is not None else " and no cache_dir was given"
            raise DataError(f"cannot write packed rows into {path} (read-only){where}: pack it once where it is "
                            f"writable with `jaxchat data prepare --seq {sequence_len}`, or pass a writable cache")
    row_len = sequence_len + 1
    train_rows = read_rows(rows_dir / "train.bin", row_len)
    val_rows = np.asarray(read_rows(rows_dir / "val.bin", row_len), dtype=np.int32)  # small; eval wants int32
    if train_rows.shape[0] != info["train"]["rows"] or val_rows.shape[0] != info["val"]["rows"]:
        raise DataError(f"{rows_dir} does not match its pack.json: delete {rows_dir} to re-pack it")
    val_shards = [path / "tokens" / s["name"] for s in manifest["shards"] if s["split"] == "val"]
    ds_info = {
        "source": manifest["params"]["source"]["spec"],
        "dataset_dir": str(path.resolve()),
        "dataset_id": manifest["dataset_id"],
        "rows_id": _rows_id(sig),
        "rows_dir": str(rows_dir.resolve()),
        "tokenizer_fingerprint": tok.fingerprint(),
        "vocab_size": tok.vocab_size,
        "bos_id": tok.bos_id,
        "sequence_len": sequence_len,
        "packing": {k: sig[k] for k in ("row_len", "split_long", "pack_buffer")},
        "train": {**info["train"], "docs_in_shards": manifest["train"]["docs"]},
        "val": {**info["val"], "docs_in_shards": manifest["val"]["docs"]},
        "val_rows_text_bytes": tok.byte_rule().count_rows(val_rows),
    }
    log(f"data: {path}: {train_rows.shape[0]:,} train rows, {val_rows.shape[0]:,} val rows of {row_len} tokens "
        f"(dataset {manifest['dataset_id'][:12]})")
    return PreparedDataset(tok, train_rows, val_rows, ds_info, val_shards, tok.bos_id)


def load_for_training(data_cfg, sequence_len: int, cache_dir: str | os.PathLike, log=print) -> Dataset:
    """The Dataset for a run: `data.source` 'stdlib' (built and cached by prepare_dataset) or a prepared
    directory. Its info (which the loop writes to the run's data.json) names the dataset exactly."""
    if data_cfg.source == "stdlib":
        ds = prepare_dataset(sequence_len=sequence_len, vocab_size=data_cfg.tokenizer_vocab, cache_dir=cache_dir,
                             max_train_chars=data_cfg.max_train_chars, tokenizer_path=data_cfg.tokenizer_path, log=log)
        ds.info = {**ds.info, **_identity(ds.info)}
        return ds
    return load_prepared(data_cfg.source, sequence_len, cache_dir, tokenizer_path=data_cfg.tokenizer_path, log=log)


def _identity(info: dict) -> dict:
    """dataset_id and rows_id of a data.json / Dataset.info (older stdlib records carry only their cache key,
    which already names the tokenizer, the corpus and the packing)."""
    if "dataset_id" in info:
        return {"dataset_id": info["dataset_id"], "rows_id": info.get("rows_id", info["dataset_id"])}
    key = info.get("key")
    return {"dataset_id": f"stdlib-{key}", "rows_id": f"stdlib-{key}"} if key else {}


def check_manifest(run_dir: str | os.PathLike, dataset: Dataset) -> None:
    """Refuse to resume a run on a dataset other than the one recorded in run_dir/data.json (written when the
    run started). Runs without data.json (imported checkpoints) have nothing to compare and pass."""
    path = Path(run_dir) / "data.json"
    if not path.is_file():
        return
    recorded = json.loads(path.read_text())
    want, got = _identity(recorded), _identity(dataset.info)
    if not want or not got:
        return

    def name(info):
        where = info.get("dataset_dir") or info.get("source", "?")
        return f"{where} (dataset_id {str(info.get('dataset_id') or _identity(info).get('dataset_id'))[:22]})"

    if want["dataset_id"] != got["dataset_id"]:
        raise DataError(f"{run_dir} was trained on {name(recorded)}, but data.source now gives {name(dataset.info)}: "
                        f"its batches would differ from the ones the run saw. Resume with "
                        f"--set data.source={recorded.get('dataset_dir') or recorded.get('source')!r} "
                        f"(recorded in {path}), or start a new run in another --run-dir")
    if want["rows_id"] != got["rows_id"]:
        raise DataError(f"{run_dir} was trained on {name(recorded)} packed as {recorded.get('packing')}, but it is "
                        f"now packed as {dataset.info.get('packing')}: resume with the run's packing, or start a "
                        f"new run in another --run-dir")


def verify(path: str | os.PathLike, log=print) -> bool:
    """Check every token shard (header and sha256) and every packed rows file against the manifest."""
    path = Path(path)
    manifest = read_manifest(path)
    ok = True
    for s in manifest["shards"]:
        f = path / "tokens" / s["name"]
        try:
            _, count = read_header(f)
            good = count == s["tokens"] and file_sha256(f) == s["sha256"]
        except DataError as e:
            log(f"  {s['name']}: {e}")
            good = False
        ok &= good
        if not good:
            log(f"  BAD {f}")
    for rows_dir in sorted(path.glob("rows-t*")):
        if not (rows_dir / "pack.json").is_file():
            continue
        info = json.loads((rows_dir / "pack.json").read_text())
        for split in ("train", "val"):
            good = info.get("dataset_id") == manifest["dataset_id"] and \
                file_sha256(rows_dir / f"{split}.bin") == info[split]["sha256"]
            ok &= good
            if not good:
                log(f"  BAD {rows_dir / f'{split}.bin'}")
    log(f"data: {path}: {len(manifest['shards'])} shards {'verified' if ok else 'FAILED verification'}")
    return ok
