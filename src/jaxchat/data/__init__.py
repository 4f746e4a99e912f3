"""
jaxchat data pipeline: text source -> tokenizer -> packed token rows -> batch(step).

- corpus.py    the embedded stdlib corpus and its stable train/val split by file
- tokenizer.py byte-level BPE (HF tokenizers), docs/architecture.md §Data: specials and split regex, token byte counts;
               loads any HF tokenizer.json, and a sentencepiece .model through sentencepiece_tok.py
- sentencepiece_tok.py  a sentencepiece .model (parameter-golf's sp1024 kind) as a tokenizer
- bytecount.py bytes per target token for bpb: context-free (byte-level) or golf's SentencePiece rule
- packing.py   BOS best-fit packing into rows of sequence_len + 1 tokens
- loader.py    batches as a pure function of (seed, step); sequential eval batches
- dataset.py   prepare_dataset: all of the above for the stdlib corpus, cached on disk
- sources.py   document sources: stdlib, .txt/.jsonl/.parquet files, HF datasets streaming, .bin token shards
- shards.py    the modded-nanogpt .bin token shard format, read and written
- prepare.py   `jaxchat data prepare`: tokenize a source into shards + manifest (resumable), pack rows offline
- prepared.py  load_for_training (stdlib or a prepared directory), check_manifest, verify
- commands.py  `jaxchat data ...` and `jaxchat tokenizer ...`

Typical use:
    ds = prepare_dataset(sequence_len=1024, vocab_size=8192, cache_dir=".cache/data")
    inputs, targets = get_batch(ds.train_rows, step, batch_size, seed)
    ds = load_for_training(cfg.data, sequence_len, cache_dir)   # data.source: "stdlib" or a prepared DIR
"""

from .bytecount import ByteRule
from .corpus import split_train_val, stdlib_documents
from .dataset import Dataset, prepare_dataset
from .loader import Prefetcher, batch_indices, get_batch, iter_eval_batches
from .packing import iter_pack_bestfit, pack_bestfit, split_long_docs
from .prepare import prepare_source
from .prepared import PreparedDataset, check_manifest, load_for_training, load_prepared, verify
from .shards import DataError, read_shard, write_shard
from .sources import open_source
from .tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, TOKENIZER_FILES, Tokenizer, find_tokenizer_file

__all__ = [
    "Dataset", "prepare_dataset", "Tokenizer", "SPECIAL_TOKENS", "SPLIT_PATTERN", "stdlib_documents",
    "split_train_val", "pack_bestfit", "iter_pack_bestfit", "split_long_docs", "batch_indices", "get_batch",
    "iter_eval_batches", "Prefetcher", "prepare_source", "PreparedDataset", "load_for_training",
    "load_prepared", "check_manifest", "verify", "DataError", "read_shard", "write_shard", "open_source",
    "ByteRule", "TOKENIZER_FILES", "find_tokenizer_file",
]
