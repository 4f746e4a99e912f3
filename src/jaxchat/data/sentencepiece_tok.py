"""
A `sentencepiece` .model file as a jaxchat tokenizer (parameter-golf's sp1024 kind), through the sentencepiece
library itself, so ids are exactly the ones golf's shards and scripts hold. Needs the `sentencepiece` extra.

It offers what jaxchat asks of a tokenizer (tokenizer.py's Tokenizer): encode (no BOS added: the data pipeline
prefixes documents itself), decode, bos_id, vocab_size, special_ids, fingerprint, save, token_bytes and
byte_rule (golf's bytes per token, bytecount.py). It is saved as `tokenizer.model` next to the data and in run
directories (TOKENIZER_FILES in tokenizer.py), byte-identical to the file it was loaded from.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from .bytecount import ByteRule, sentencepiece_rule

FILE_NAME = "tokenizer.model"


def _spm():
    try:
        import sentencepiece
    except ImportError:
        raise ValueError("reading a sentencepiece .model needs the optional package `sentencepiece`: "
                         "pip install 'jaxchat[sentencepiece]'") from None
    return sentencepiece


class SentencePieceTokenizer:
    """A sentencepiece model. Build with `load(path)` or `from_bytes(model_proto)`."""

    file_name = FILE_NAME
    kind = "sentencepiece"

    def __init__(self, proto: bytes, origin: str = "<bytes>"):
        spm = _spm()
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=proto)
        except Exception as e:  # sentencepiece raises RuntimeError (or OSError) with a protobuf message
            raise ValueError(f"{origin} is not a sentencepiece model (the protobuf does not parse: "
                             f"{str(e).strip()[:200]}): pass a .model file written by sentencepiece's trainer, or "
                             f"a HF tokenizer.json") from None
        self.proto = bytes(proto)
        self.origin = origin

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SentencePieceTokenizer":
        path = Path(path)
        return cls(path.read_bytes(), origin=str(path))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model (atomically) to `path`, or to `path`/tokenizer.model if it is a directory."""
        path = Path(path)
        if path.is_dir():
            path = path / FILE_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_bytes(self.proto)
        os.replace(tmp, path)
        return path

    # ----------------------------------------------------------------------------------------------------
    # encode / decode

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once; sentencepiece spreads the work over all cores."""
        return self.sp.encode(list(texts), num_threads=os.cpu_count() or 1)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def decode_batch(self, docs: list[list[int]]) -> list[str]:
        return self.sp.decode([[int(i) for i in d] for d in docs])

    def decode_after(self, prefix: list[int], ids: Iterable[int]) -> str:
        """The text `ids` add after `prefix` (a piece "▁x" after a prompt is " x", where alone it decodes "x")."""
        head = self.decode(prefix)
        whole = self.decode(list(prefix) + [int(i) for i in ids])
        return whole[len(head):] if whole.startswith(head) else self.decode(ids)

    def id_to_token(self, i: int) -> str | None:
        return self.sp.id_to_piece(int(i)) if 0 <= int(i) < self.vocab_size else None

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)  # (an unknown piece maps to <unk>'s id: check it is this piece)
        return i if self.sp.id_to_piece(i) == token else None

    # ----------------------------------------------------------------------------------------------------
    # properties

    @functools.cached_property
    def vocab_size(self) -> int:
        return int(self.sp.get_piece_size())

    @property
    def bos_id(self) -> int:
        i = int(self.sp.bos_id())
        if i < 0:
            i = self.token_to_id("<s>") if self.token_to_id("<s>") is not None else -1
        if i < 0:
            raise ValueError(f"the sentencepiece model {self.origin} has no BOS piece (it was trained with "
                             f"bos_id=-1), so documents cannot be delimited: train it with a BOS (the default, "
                             f"id 1, as parameter-golf's sp1024)")
        return i

    def _is_boundary(self, i: int) -> bool:
        return bool(self.sp.is_control(i) or self.sp.is_unknown(i) or self.sp.is_unused(i))

    @property
    def special_ids(self) -> list[int]:
        """Control, unknown and unused pieces: golf's boundary tokens."""
        return [i for i in range(self.vocab_size) if self._is_boundary(i)]

    def byte_rule(self) -> ByteRule:
        """Golf's bytes per token (bytecount.py), from the model's own piece types as `build_sentencepiece_luts`."""
        if getattr(self, "_rule", None) is None:
            n = self.vocab_size
            pieces = [self.sp.id_to_piece(i) for i in range(n)]
            self._rule = sentencepiece_rule(pieces, [self._is_boundary(i) for i in range(n)],
                                            [bool(self.sp.is_byte(i)) for i in range(n)])
        return self._rule

    def token_bytes(self) -> np.ndarray:
        """int32 (vocab_size,): bytes of each token after a non-boundary token (its leading space counted);
        bpb uses byte_rule(), which also knows the case after a boundary."""
        rule = self.byte_rule()
        return (rule.base + rule.leading_space).astype(np.int32)

    def fingerprint(self) -> str:
        """sha256 hex of the serialized model: equal iff the models are the same."""
        return hashlib.sha256(self.proto).hexdigest()

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer(vocab_size={self.vocab_size}, bos={self.bos_id}, " \
               f"fingerprint={self.fingerprint()[:12]})"
