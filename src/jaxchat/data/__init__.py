"""
jaxchat data pipeline: text source -> tokenizer -> packed token rows -> batch(step).

- corpus.py    the embedded stdlib corpus and its stable train/val split by file
- tokenizer.py byte-level BPE (HF tokenizers), SPEC §4 specials and split regex, token byte counts
- packing.py   BOS best-fit packing into rows of sequence_len + 1 tokens
- loader.py    batches as a pure function of (seed, step); sequential eval batches
- dataset.py   prepare_dataset: all of the above, cached on disk

Typical use:
    ds = prepare_dataset(sequence_len=1024, vocab_size=8192, cache_dir=".cache/data")
    inputs, targets = get_batch(ds.train_rows, step, batch_size, seed)
"""

from .corpus import split_train_val, stdlib_documents
from .dataset import Dataset, prepare_dataset
from .loader import batch_indices, get_batch, iter_eval_batches
from .packing import pack_bestfit, split_long_docs
from .tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

__all__ = [
    "Dataset", "prepare_dataset", "Tokenizer", "SPECIAL_TOKENS", "SPLIT_PATTERN", "stdlib_documents",
    "split_train_val", "pack_bestfit", "split_long_docs", "batch_indices", "get_batch", "iter_eval_batches",
]
