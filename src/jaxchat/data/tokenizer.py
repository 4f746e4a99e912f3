"""
Byte-level BPE tokenizer (docs/architecture.md §Data), a thin wrapper around a HF `tokenizers.Tokenizer`.

Design choices (same as nanochat's HuggingFaceTokenizer, with the specials moved to the end):
- pre-tokenizer: Split on the GPT-4-style split regex (docs/architecture.md §Data) (digits grouped 1-2, behavior "isolated"), then
  ByteLevel(add_prefix_space=False, use_regex=False), which maps every byte to one printable character;
- model: BPE trained by HF's BpeTrainer, initial alphabet = all 256 byte characters, so every string encodes
  and nothing is ever unknown; no normalizer, so decode(encode(s)) == s exactly;
- decoder: ByteLevel;
- vocab: `vocab_size` in total = (vocab_size - 9) BPE ranks, then the 9 specials at ids vocab_size-9 ..
  vocab_size-1, `<|bos|>` first.

Any other `tokenizer.json` loads too (e.g. GPT-2's, Mistral's); then `bos_id` is `<|bos|>` if present, else
`<s>`, else `<|endoftext|>`. Bytes per token (bpb's denominator, bytecount.py) are exact for byte-level
tokenizers (GPT-2 and friends); tokenizers of the SentencePiece kind (Metaspace `▁`, `<0xNN>` byte fallback:
Mistral, Llama) count by parameter-golf's rule, where a leading `▁` is a byte unless the previous token is a
boundary (BOS, EOS, unk); for anything else `▁` counts as a space and `<0xNN>` as one byte.

`Tokenizer.load` also reads a sentencepiece `.model` (sentencepiece_tok.py, golf's sp1024 kind); a directory
holds its tokenizer as one of TOKENIZER_FILES.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterable

import numpy as np
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from .bytecount import ByteRule, sentencepiece_rule

SPECIAL_TOKENS = [
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
]

SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

_BYTE_FALLBACK = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
METASPACE = "\u2581"

# The file a directory (prepared dataset, run) holds its tokenizer in: a HF tokenizer.json, or a sentencepiece model.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def find_tokenizer_file(directory: str | os.PathLike) -> Path | None:
    """`directory`/tokenizer.json or `directory`/tokenizer.model, whichever exists (None if neither)."""
    for name in TOKENIZER_FILES:
        if (Path(directory) / name).is_file():
            return Path(directory) / name
    return None


def _is_json(path: Path) -> bool:
    """A tokenizer.json starts with "{"; a sentencepiece model (a protobuf) never does (its first byte is a
    field tag, 0x0A)."""
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    return head[:1] == b"{"


@functools.lru_cache(maxsize=1)
def byte_level_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: printable character -> the byte it stands for.
    Printable Latin-1 bytes map to themselves; the other 68 bytes map to chr(256 + n), in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, n = {}, 0
    for b in range(256):
        if b in keep:
            mapping[chr(b)] = b
        else:
            mapping[chr(256 + n)] = b
            n += 1
    return mapping


def _components(part: dict | None) -> list[dict]:
    """A normalizer/pre-tokenizer/decoder and, for a Sequence, its members."""
    if not part:
        return []
    inner = part.get("decoders") or part.get("pretokenizers") or part.get("normalizers") or []
    return [part, *inner]


def _uses_byte_level(tok_json: dict) -> bool:
    """True if the tokenizer's decoder is ByteLevel (alone or inside a Sequence)."""
    return any(d.get("type") == "ByteLevel" for d in _components(tok_json.get("decoder")))


def _uses_metaspace(tok_json: dict) -> bool:
    """True for tokenizers of the SentencePiece kind: words carry a leading "▁" (Metaspace pre-tokenizer or
    decoder, as Mistral's and newer Llama files; or a normalizer that replaces " " by "▁" and a decoder that
    turns it back, as older Llama files)."""
    parts = [*_components(tok_json.get("pre_tokenizer")), *_components(tok_json.get("decoder"))]
    if any(p.get("type") == "Metaspace" for p in parts):
        return True
    replaces = [p for p in _components(tok_json.get("normalizer")) + _components(tok_json.get("decoder"))
                if p.get("type") == "Replace"]
    return any(METASPACE in json.dumps(p, ensure_ascii=False) for p in replaces)


class Tokenizer:
    """A HF tokenizer with the few methods jaxchat needs. Build with `train` or `load`."""

    file_name = "tokenizer.json"

    def __init__(self, hf: HFTokenizer):
        self.hf = hf
        self._token_bytes: np.ndarray | None = None
        self._bytes: list[bytes] | None = None
        self._rule: ByteRule | None = None

    # ----------------------------------------------------------------------------------------------------
    # construction

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        """Train a byte-level BPE of `vocab_size` tokens in total (9 of them specials, appended last)."""
        num_ranks = vocab_size - len(SPECIAL_TOKENS)
        if num_ranks <= 256:
            raise ValueError(f"vocab_size={vocab_size} must be >= {256 + len(SPECIAL_TOKENS) + 1} "
                             f"(256 byte tokens + {len(SPECIAL_TOKENS)} specials + at least one merge)")
        hf = HFTokenizer(models.BPE(byte_fallback=False, fuse_unk=False))
        hf.normalizer = None
        hf.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(pattern=Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        hf.decoder = decoders.ByteLevel()
        hf.post_processor = None
        trainer = trainers.BpeTrainer(
            vocab_size=num_ranks,
            min_frequency=0,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],  # added after training, so they land at the end of the vocab
        )
        hf.train_from_iterator(texts, trainer=trainer)
        got = hf.get_vocab_size(with_added_tokens=True)
        if got != num_ranks:
            raise ValueError(f"the training text yields only {got} BPE tokens but vocab_size={vocab_size} needs "
                             f"{num_ranks} (+{len(SPECIAL_TOKENS)} specials): give more text or a smaller vocab")
        hf.add_special_tokens(SPECIAL_TOKENS)
        tok = cls(hf)
        assert tok.hf.token_to_id(SPECIAL_TOKENS[0]) == vocab_size - len(SPECIAL_TOKENS)
        assert tok.vocab_size == vocab_size
        return tok

    @classmethod
    def load(cls, path: str | os.PathLike):
        """Load a HF `tokenizer.json`, a sentencepiece `.model` (a SentencePieceTokenizer), or a directory holding
        one of TOKENIZER_FILES."""
        path = Path(path)
        if path.is_dir():
            path = find_tokenizer_file(path) or path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {path}: pass a HF tokenizer.json or a sentencepiece "
                                    f".model (or a directory holding tokenizer.json or tokenizer.model), or leave "
                                    f"the tokenizer path empty to train one")
        if path.suffix == ".model" or (path.suffix != ".json" and not _is_json(path)):
            from .sentencepiece_tok import SentencePieceTokenizer
            return SentencePieceTokenizer.load(path)
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # HF raises a bare Exception on malformed files
            raise ValueError(f"{path} is not a readable HF tokenizer.json: {e}") from e
        return cls(hf)

    def save(self, path: str | os.PathLike) -> Path:
        """Write `tokenizer.json` atomically (to `path`, or into `path` if it is a directory)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text(self.hf.to_str(), encoding="utf-8")
        os.replace(tmp, path)
        return path

    # ----------------------------------------------------------------------------------------------------
    # encode / decode

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once; HF spreads the work over all cores."""
        return [e.ids for e in self.hf.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def decode_batch(self, docs: list[list[int]]) -> list[str]:
        """Decode many documents at once, special tokens left out."""
        return self.hf.decode_batch([[int(i) for i in d] for d in docs], skip_special_tokens=True)

    def decode_after(self, prefix: list[int], ids: Iterable[int]) -> str:
        """The text `ids` add after `prefix`. Byte-level: decode(ids). SentencePiece kind: a leading "▁x" is
        " x" after a prompt, where decoded alone it loses its space."""
        ids = [int(i) for i in ids]
        if not self._metaspace:
            return self.decode(ids)
        head = self.decode(prefix)
        whole = self.decode(list(prefix) + ids)
        return whole[len(head):] if whole.startswith(head) else self.decode(ids)

    def id_to_token(self, i: int) -> str | None:
        return self.hf.id_to_token(i)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    # ----------------------------------------------------------------------------------------------------
    # properties

    @functools.cached_property
    def vocab_size(self) -> int:
        """Number of ids (max id + 1), specials included."""
        ids = list(self.hf.get_vocab(with_added_tokens=True).values())
        return max(ids) + 1 if ids else 0

    @property
    def bos_id(self) -> int:
        """`<|bos|>`; else `<s>` (SentencePiece-style: Llama, Mistral, the seed cards' tokenizer); else
        `<|endoftext|>` for tokenizers (GPT-2 style) that have no BOS."""
        for name in ("<|bos|>", "<s>", "<|endoftext|>"):
            i = self.hf.token_to_id(name)
            if i is not None:
                return i
        raise ValueError("this tokenizer has none of <|bos|>, <s>, <|endoftext|>, so documents cannot be delimited: "
                         "use a tokenizer that has one of them, or train one (leave the tokenizer path empty)")

    @property
    def special_ids(self) -> list[int]:
        return sorted(i for i, t in self.hf.get_added_tokens_decoder().items() if t.special)

    @functools.cached_property
    def _json(self) -> dict:
        return json.loads(self.hf.to_str())

    @functools.cached_property
    def _metaspace(self) -> bool:
        return not _uses_byte_level(self._json) and _uses_metaspace(self._json)

    @property
    def kind(self) -> str:
        """'byte-level' (GPT-2 style bytes), 'sentencepiece-json' (Metaspace: Mistral, Llama) or 'other'."""
        return "byte-level" if _uses_byte_level(self._json) else "sentencepiece-json" if self._metaspace else "other"

    def byte_rule(self) -> ByteRule:
        """Bytes per target token for bpb (bytecount.py): golf's SentencePiece rule for tokenizers of that kind
        (specials and the unk token are boundaries, `<0xNN>` pieces 1 byte, a leading "▁" a byte after a
        non-boundary), else the context-free token_bytes()."""
        if self._rule is None:
            if self._metaspace:
                n = self.vocab_size
                pieces, boundary, byte_fb = [""] * n, np.ones(n, dtype=bool), np.zeros(n, dtype=bool)
                model = self._json.get("model") or {}
                unk = model.get("unk_token")
                has_fallback = bool(model.get("byte_fallback"))
                added = self.hf.get_added_tokens_decoder()
                for token, i in self.hf.get_vocab(with_added_tokens=True).items():
                    if i in added and added[i].special or token == unk:
                        continue  # control / unknown: a boundary, 0 bytes
                    boundary[i] = False
                    if i in added:  # a non-special added token is emitted verbatim
                        pieces[i] = added[i].content
                    else:
                        pieces[i] = token
                        byte_fb[i] = has_fallback and bool(_BYTE_FALLBACK.match(token))
                self._rule = sentencepiece_rule(pieces, boundary, byte_fb)
            else:
                specials = np.zeros(self.vocab_size, dtype=bool)
                specials[self.special_ids] = True
                self._rule = ByteRule.flat(self.token_bytes(), specials)
        return self._rule

    def token_bytes(self) -> np.ndarray:
        """int32 (vocab_size,): how many UTF-8 bytes each token stands for; specials (and unused ids) are 0.
        (For the SentencePiece kind a leading "▁" counts as a space here; bpb uses byte_rule(), which does not
        count it after a boundary.)

        Computed from the byte-level mapping of each token's string, never by decoding a single token to str
        (a token may hold part of a multi-byte character, which would decode to U+FFFD)."""
        if self._token_bytes is None:
            self._token_bytes = np.array([len(b) for b in self._byte_table()], dtype=np.int32)
        return self._token_bytes

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The exact bytes `ids` stand for, specials contributing nothing. Unlike decode(...).encode(), a
        sequence that starts or ends inside a multi-byte character keeps its true bytes."""
        table = self._byte_table()
        return b"".join(table[int(i)] for i in ids)

    def _byte_table(self) -> list[bytes]:
        """bytes of every id (b"" for specials and unused ids). Exact for byte-level tokenizers; for others a
        best effort (Metaspace `▁` is a space, `<0xNN>` byte-fallback pieces are that byte)."""
        if self._bytes is not None:
            return self._bytes
        table = [b""] * self.vocab_size
        byte_level = _uses_byte_level(json.loads(self.hf.to_str()))
        inv = byte_level_decoder()
        added = self.hf.get_added_tokens_decoder()
        for token, i in self.hf.get_vocab(with_added_tokens=True).items():
            if i in added:  # added tokens are matched and emitted verbatim, not byte-level encoded
                table[i] = b"" if added[i].special else added[i].content.encode("utf-8")
            elif byte_level and all(ch in inv for ch in token):
                table[i] = bytes(inv[ch] for ch in token)  # one character per byte
            elif _BYTE_FALLBACK.match(token):
                table[i] = bytes([int(token[3:5], 16)])
            else:
                table[i] = token.replace("\u2581", " ").encode("utf-8")
        self._bytes = table
        return table

    def fingerprint(self) -> str:
        """sha256 hex of the serialized tokenizer: equal iff the tokenizers are the same."""
        return hashlib.sha256(self.hf.to_str().encode("utf-8")).hexdigest()

    def __repr__(self) -> str:
        bos = next((i for i in map(self.hf.token_to_id, ("<|bos|>", "<s>", "<|endoftext|>")) if i is not None), None)
        return f"Tokenizer(vocab_size={self.vocab_size}, bos={bos}, fingerprint={self.fingerprint()[:12]})"
