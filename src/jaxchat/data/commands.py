"""`jaxchat data prepare|pack|info|verify` and `jaxchat tokenizer train|eval`: argparse wiring.

cli.py registers these with `add_parsers(subparsers)`. User errors raise DataError (a ConfigError), which
the CLI prints as one line.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from jaxchat.argtypes import count_int, positive_int

from .prepare import pack, prepare_source, rows_dir_name
from .prepared import read_manifest, verify
from .shards import DataError, read_header
from .sources import open_source
from .tokenizer import SPECIAL_TOKENS, Tokenizer


def _source_args(p) -> None:
    p.add_argument("source", nargs="+", metavar="SOURCE",
                   help="stdlib | files, directories or globs of .txt/.jsonl/.parquet (or .bin token shards) | "
                        "hf:NAME[:CONFIG] (Hugging Face datasets, streamed)")
    p.add_argument("--text-field", default="text", help="JSON field / parquet column / HF column of the text")
    p.add_argument("--hf-config", default=None, help="HF dataset config (or write hf:NAME:CONFIG), e.g. en")
    p.add_argument("--split", default="train", help="HF dataset split to stream (default train)")
    p.add_argument("--data-files", nargs="+", default=None, help="HF data_files, e.g. with hf:json or hf:parquet")


def _open(args, spec=None):
    return open_source(spec if spec is not None else args.source, text_field=args.text_field,
                       hf_config=args.hf_config, split=args.split, data_files=args.data_files)


def _load_tokenizer(path):
    try:
        return Tokenizer.load(path)
    except ValueError as e:
        raise DataError(str(e)) from None


def _texts(source, max_docs: int = 0, max_chars: int = 0):
    """The source's texts, at most max_docs documents and max_chars characters (0 = no cap)."""
    texts = source.documents()
    if max_docs:
        texts = itertools.islice(texts, max_docs)
    total = 0
    for text in texts:
        if max_chars and total + len(text) >= max_chars:
            yield text[: max_chars - total]
            return
        total += len(text)
        yield text


def cmd_prepare(args) -> None:

    tok = _load_tokenizer(args.tokenizer)
    source = _open(args)
    val_source = _open(args, args.val) if args.val else None
    m = prepare_source(source, tok, args.out, val_docs=args.val_docs, val_source=val_source, seq=args.seq,
                shard_tokens=args.shard_tokens, max_docs=args.max_docs, max_tokens=args.max_tokens,
                split_long=not args.no_split_long,
                progress=not args.no_progress)
    print(f"{args.out}: train {m['train']['tokens']:,} tokens ({m['train']['docs']:,} docs), val "
          f"{m['val']['tokens']:,} tokens ({m['val']['docs']:,} docs), {m['params']['dtype']}; "
          f"dataset_id {m['dataset_id'][:16]}")
    if args.seq:
        name = rows_dir_name(args.seq, not args.no_split_long)
        info = json.loads((Path(args.out) / name / "pack.json").read_text())
        for split in ("train", "val"):
            st = info[split]
            print(f"  {split} rows: {st['rows']:,} x {args.seq + 1}; packing cropped {st['tokens_cropped']:,} tokens "
                  f"({st['tokens_cropped'] / max(st['tokens_in'], 1):.2%}) and dropped {st['tokens_dropped']:,}")
    print(f"train on it with: jaxchat train --set data.source={args.out}")


def cmd_pack(args) -> None:

    path = Path(args.dir)
    split_long = not args.no_split_long
    pack(path, read_manifest(path), args.seq, path / rows_dir_name(args.seq, split_long), split_long)


def cmd_info(args) -> None:

    path = Path(args.path)
    if path.is_file():
        version, count = read_header(path)
        print(f"{path}: modded-nanogpt token shard, version {version} ({'uint16' if version == 1 else 'uint32'}), "
              f"{count:,} tokens")
        return
    m = read_manifest(path)
    p = m["params"]
    print(f"{path}: dataset_id {m['dataset_id']}")
    print(f"  source     {p['source']['spec']}" + (f" (val: {p['val_source']['spec']})" if p["val_source"] else ""))
    print(f"  tokenizer  sha256 {p['tokenizer_sha256'][:16]}, vocab {p['vocab_size']}, bos {p['bos_id']}, {p['dtype']}")
    for split in ("train", "val"):
        n = m[split]
        print(f"  {split:<10} {n['docs']:>12,} docs {n['tokens']:>15,} tokens in {n['shards']} shards")
    for rows_dir in sorted(path.glob("rows-t*")):
        if (rows_dir / "pack.json").is_file():
            info = json.loads((rows_dir / "pack.json").read_text())
            print(f"  {rows_dir.name:<10} train {info['train']['rows']:,} rows, val {info['val']['rows']:,} rows; "
                  f"cropped {info['train']['tokens_cropped']:,} train tokens")


def cmd_verify(args) -> None:

    if not verify(args.dir):
        raise DataError(f"{args.dir} failed verification: prepare it again (delete it first)")


def cmd_tokenizer_train(args) -> None:

    out = Path(args.out)
    target = out / "tokenizer.json" if out.is_dir() else out
    if target.exists() and not args.force:
        raise DataError(f"--out {target} already exists: choose another path, or pass --force to overwrite it")
    source = _open(args)
    try:
        tok = Tokenizer.train(_texts(source, args.max_docs, args.max_chars), args.vocab)
    except ValueError as e:
        raise DataError(str(e)) from None
    tok.save(args.out)
    print(f"{args.out}: byte-level BPE, vocab {tok.vocab_size} ({tok.vocab_size - len(SPECIAL_TOKENS)} ranks + {len(SPECIAL_TOKENS)} specials), "
          f"bos id {tok.bos_id}, sha256 {tok.fingerprint()[:16]}")


def bytes_per_token(tok, texts, batch_docs: int = 256) -> tuple[int, int]:
    """(UTF-8 bytes, tokens) of `texts` encoded with `tok`."""
    nbytes = ntok = 0
    texts = iter(texts)
    for batch in iter(lambda: list(itertools.islice(texts, batch_docs)), []):
        nbytes += sum(len(t.encode("utf-8")) for t in batch)
        ntok += sum(len(x) for x in tok.encode_batch(batch))
    return nbytes, ntok


def cmd_tokenizer_eval(args) -> None:
    toks = [(p, _load_tokenizer(p)) for p in args.tokenizer]
    texts = list(_texts(_open(args), args.max_docs, args.max_chars))
    rows = []
    for path, tok in toks:
        nbytes, ntok = bytes_per_token(tok, texts)
        rows.append((str(path), tok.vocab_size, ntok, nbytes / max(ntok, 1)))
    width = max(len(r[0]) for r in rows)
    print(f"{' '.join(args.source)}: {len(texts):,} docs, {nbytes:,} bytes")
    print(f"{'tokenizer':<{width}}  {'vocab':>7}  {'tokens':>12}  {'bytes/token':>11}  {'vs first':>8}")
    for name, vocab, ntok, bpt in rows:
        print(f"{name:<{width}}  {vocab:>7,}  {ntok:>12,}  {bpt:>11.3f}  {bpt / rows[0][3]:>7.3f}x")


def add_parsers(sub) -> None:
    d = sub.add_parser("data", help="prepare token shards and packed rows from text; inspect and verify them")
    dsub = d.add_subparsers(dest="data_cmd", required=True)

    p = dsub.add_parser("prepare", help="tokenize SOURCE into shards + manifest (resumable), pack rows with --seq")
    _source_args(p)
    p.add_argument("--tokenizer", required=True, help="a HF tokenizer.json or a sentencepiece .model (or a directory holding tokenizer.json/.model)")
    p.add_argument("--out", required=True, help="the dataset directory to write (train with data.source=DIR)")
    p.add_argument("--val-docs", type=count_int, default=None,
                   help="validation = the first N documents (default 1000; stdlib: its own file-hash split)")
    p.add_argument("--val", nargs="+", default=None, metavar="SOURCE", help="a separate validation source")
    p.add_argument("--seq", type=positive_int, default=None, help="also pack rows of SEQ+1 tokens (training sequence length)")
    p.add_argument("--max-docs", type=count_int, default=0, help="stop after N train documents (0 = all)")
    p.add_argument("--max-tokens", type=count_int, default=0,
                   help="stop the train split at the first document boundary at or past N tokens (0 = all)")
    p.add_argument("--shard-tokens", type=positive_int, default=100_000_000, help="tokens per shard (default 100M, prepare.DEFAULT_SHARD_TOKENS)")
    p.add_argument("--no-split-long", action="store_true",
                   help="let best-fit crop documents longer than a row instead of cutting them into row-sized pieces")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_prepare)

    p = dsub.add_parser("pack", help="pack a prepared directory into rows for another sequence length")
    p.add_argument("dir")
    p.add_argument("--seq", type=positive_int, required=True)
    p.add_argument("--no-split-long", action="store_true")
    p.set_defaults(fn=cmd_pack)

    p = dsub.add_parser("info", help="summary of a prepared directory, or the header of a .bin shard")
    p.add_argument("path")
    p.set_defaults(fn=cmd_info)

    p = dsub.add_parser("verify", help="check every shard and rows file against the manifest's sha256")
    p.add_argument("dir")
    p.set_defaults(fn=cmd_verify)

    t = sub.add_parser("tokenizer", help="train a BPE tokenizer on a source, or compare tokenizers on one")
    tsub = t.add_subparsers(dest="tokenizer_cmd", required=True)

    p = tsub.add_parser("train", help="train a byte-level BPE (nanochat's split regex and specials) into tokenizer.json")
    _source_args(p)
    p.add_argument("--vocab", type=positive_int, required=True, help="total vocab size, 9 specials included")
    p.add_argument("--out", required=True, help="where to write tokenizer.json")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    p.add_argument("--max-chars", type=count_int, default=2_000_000_000, help="train on at most this many characters")
    p.add_argument("--max-docs", type=count_int, default=0, help="and at most this many documents (0 = no cap)")
    p.set_defaults(fn=cmd_tokenizer_train)

    p = tsub.add_parser("eval", help="bytes per token of one or more tokenizers on a source, side by side")
    _source_args(p)
    p.add_argument("--tokenizer", action="append", required=True, help="a tokenizer.json or sentencepiece .model (repeat to compare)")
    p.add_argument("--max-chars", type=count_int, default=20_000_000, help="evaluate on at most this many characters")
    p.add_argument("--max-docs", type=count_int, default=0, help="and at most this many documents (0 = no cap)")
    p.set_defaults(fn=cmd_tokenizer_eval)
