"""
How many bytes of text each target token stands for, the denominator of bits per byte (docs/data.md §Bytes).

Two rules, one shape. A `ByteRule` holds three tables over the vocabulary,
    base[v]           bytes of token v on its own,
    leading_space[v]  v starts with SentencePiece's "▁", which is one more byte (a space) ...
    boundary[v]       ... unless the token before it is a boundary (control/unknown/unused: BOS, EOS, <unk>),
and the bytes of a target token t preceded by p are  base[t] + (leading_space[t] and not boundary[p]).

- Byte-level BPE (nanochat's, GPT-2's): leading_space is all False, so a token's bytes are base[t], its UTF-8
  length, whatever precedes it (the numbers jaxchat always reported).
- SentencePiece kind (a sentencepiece .model such as parameter-golf's sp1024; HF tokenizer.json files with
  Metaspace and byte fallback such as Mistral's and Llama's): parameter-golf's rule, exactly as PR #334's
  `build_sentencepiece_luts` builds it (SPEC_SPEEDRUN §4): control/unknown/unused pieces are boundaries with 0
  bytes, byte-fallback pieces `<0xNN>` 1 byte, any other piece the UTF-8 length of the piece without its first
  "▁", plus the leading space when the previous token is not a boundary. (Only the first "▁" is dropped, as the
  reference does with `piece[1:]`: a piece "▁▁" is 3 + 1 bytes there, not 2. Tokenizers trained with
  sentencepiece's defaults, golf's included, have no piece with a second "▁".)

`all_targets` is the other half of golf's bpb: golf divides the NLL of every target by the bytes, while
jaxchat (as nanochat) sums the NLL of the targets that have bytes only. The SentencePiece rule sets it, so a
golf tokenizer's bpb is golf's number; byte-level tokenizers keep nanochat's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ByteRule:
    base: np.ndarray            # int32 (V,)
    leading_space: np.ndarray   # bool (V,)
    boundary: np.ndarray        # bool (V,)
    all_targets: bool = False   # bpb's numerator: NLL of all targets (golf) or of those with bytes (nanochat)

    def __post_init__(self):
        n = len(self.base)
        if len(self.leading_space) != n or len(self.boundary) != n:
            raise ValueError(f"ByteRule tables differ in length: base {n}, leading_space {len(self.leading_space)}, "
                             f"boundary {len(self.boundary)}")

    @classmethod
    def flat(cls, token_bytes, boundary=None) -> "ByteRule":
        """A context-free rule: every token is `token_bytes[t]` bytes (byte-level BPE)."""
        base = np.asarray(token_bytes, dtype=np.int32)
        bnd = np.asarray(boundary, dtype=bool) if boundary is not None else base == 0
        return cls(base, np.zeros(len(base), dtype=bool), bnd, all_targets=False)

    @property
    def contextual(self) -> bool:
        """True when a token's bytes depend on the token before it."""
        return bool(self.leading_space.any())

    def count(self, prev, targets) -> np.ndarray:
        """Bytes of each target given the token before it (arrays of one shape; int64)."""
        prev, targets = np.asarray(prev), np.asarray(targets)
        return (self.base[targets].astype(np.int64)
                + (self.leading_space[targets] & ~self.boundary[prev]).astype(np.int64))

    def count_rows(self, rows) -> int:
        """Bytes of every token of `rows` (N, L), each row's first token counted as if after a boundary (rows
        start with BOS, which is one)."""
        rows = np.asarray(rows)
        if rows.size == 0:
            return 0
        first = int(self.base[rows[:, 0]].sum())
        return first + int(self.count(rows[:, :-1], rows[:, 1:]).sum())


def sentencepiece_rule(pieces: list[str], boundary, byte_fallback) -> ByteRule:
    """Golf's rule over a vocabulary: `pieces[i]` the piece string, `boundary[i]` control/unknown/unused,
    `byte_fallback[i]` a `<0xNN>` byte piece."""
    n = len(pieces)
    base = np.zeros(n, dtype=np.int32)
    lead = np.zeros(n, dtype=bool)
    bnd = np.asarray(boundary, dtype=bool).copy()
    for i, piece in enumerate(pieces):
        if bnd[i]:
            continue
        if byte_fallback[i]:
            base[i] = 1
            continue
        if piece.startswith("\u2581"):
            lead[i] = True
            piece = piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return ByteRule(base, lead, bnd, all_targets=True)
