"""Conversations: nanochat's chat format, rendered to token ids with a loss mask, read from files, packed into rows.

A conversation is `{"messages": [{"role": ..., "content": ...}, ...]}` (the SmolTalk shape): an optional
system message first, then user and assistant turns strictly alternating, starting with the user. A user's
content is a string; an assistant's is a string or a list of parts `{"type": "text" | "python" |
"python_output", "text": ...}` (a tool call and its result).

Rendering (nanochat's `render_conversation`; mask 1 = the model is trained to predict this token):

    <|bos|>                                              mask 0
    <|user_start|> user text <|user_end|>                mask 0   (a system message is prepended to the
                                                                   first user text, joined by a blank line)
    <|assistant_start|>                                  mask 0
        text                                             mask 1
        <|python_start|> code <|python_end|>             mask 1   (the model writes the tool call)
        <|output_start|> result <|output_end|>           mask 0   (the tool writes its result)
    <|assistant_end|>                                    mask 1

Special-token text typed inside a message (e.g. a user writing "<|assistant_end|>") is encoded as ordinary
characters, never as the special token, so no message can forge the structure.

Packing (nanochat's SFT loader, done once): rows of T+1 tokens each start with a conversation's BOS; the
largest buffered conversation that fits whole goes in next; when none fits, the row is padded with BOS at mask
0. A conversation is never split, so one longer than a row is refused when it is read.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxchat.config import ConfigError
from jaxchat.data.tokenizer import SPECIAL_TOKENS

ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "python", "python_output")
PACK_BUFFER = 100  # conversations the packer looks ahead over (nanochat's SFT loader)
_SPECIAL_RE = re.compile("(" + "|".join(map(re.escape, SPECIAL_TOKENS)) + ")")


@dataclass(frozen=True)
class Specials:
    """The ids of the chat special tokens in one tokenizer."""

    bos: int
    user_start: int
    user_end: int
    assistant_start: int
    assistant_end: int
    python_start: int
    python_end: int
    output_start: int
    output_end: int

    @classmethod
    def of(cls, tok) -> "Specials":
        ids = {name: tok.token_to_id(name) for name in SPECIAL_TOKENS}
        missing = [name for name, i in ids.items() if i is None]
        if missing:
            raise ConfigError(f"the tokenizer has no {', '.join(missing)}: chat needs a tokenizer with jaxchat's "
                              f"special tokens (one trained by `jaxchat tokenizer train` or by a jaxchat run)")
        return cls(*(ids[name] for name in SPECIAL_TOKENS))


def encode_text(tok, text: str) -> list[int]:
    """Token ids of `text` with any special-token text in it encoded as plain characters (split after its
    first character, so the tokenizer never matches the special)."""
    ids: list[int] = []
    for i, piece in enumerate(_SPECIAL_RE.split(text)):
        if i % 2:  # a special token's text
            ids += tok.encode(piece[:1]) + tok.encode(piece[1:])
        elif piece:
            ids += tok.encode(piece)
    return ids


def validate(messages, where: str, final: str | None = None) -> list[dict]:
    """The messages with a system message merged into the first user turn; a ConfigError naming `where` (e.g.
    "chats.jsonl line 3") if they are not a well-formed conversation. `final` requires the last role."""
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else m
            raise ConfigError(f"{where}: message {j} has role {role!r}; roles are {', '.join(ROLES)}")
        _check_content(m, f"{where}: message {j} ({m['role']})")
    if messages[0]["role"] == "system":
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise ConfigError(f"{where}: a system message must be followed by a user message")
        first = {"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
        messages = [first] + messages[2:]
    for j, m in enumerate(messages):
        expected = "user" if j % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ConfigError(f"{where}: turn {j} is from {m['role']} but should be from {expected} (user and "
                              f"assistant alternate, the user first; a system message only comes first)")
    if final is not None and messages[-1]["role"] != final:
        raise ConfigError(f"{where}: the last message must be from the {final}")
    return messages


def _check_content(m: dict, where: str) -> None:
    content = m.get("content")
    if isinstance(content, str):
        if not content.strip():
            raise ConfigError(f"{where} has empty content")
        return
    if m["role"] != "assistant" or not isinstance(content, list) or not content:
        raise ConfigError(f"{where}: content must be a non-empty string"
                          + (" or a list of parts" if m["role"] == "assistant" else ""))
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in PART_TYPES:
            raise ConfigError(f"{where}: each part must be {{type, text}} with type one of {', '.join(PART_TYPES)}")
        if not isinstance(part.get("text"), str) or not part["text"]:
            raise ConfigError(f"{where}: a {part['type']} part has empty text")


def render(tok, messages, where: str = "conversation") -> tuple[list[int], list[int]]:
    """(ids, mask) of a conversation; mask 1 marks the tokens the assistant is trained on."""
    sp = Specials.of(tok)
    ids, mask = [sp.bos], [0]

    def add(tokens, m):
        ids.extend(tokens)
        mask.extend([m] * len(tokens))

    for msg in validate(messages, where):
        if msg["role"] == "user":
            add([sp.user_start, *encode_text(tok, msg["content"]), sp.user_end], 0)
            continue
        add([sp.assistant_start], 0)
        content = msg["content"]
        for part in [{"type": "text", "text": content}] if isinstance(content, str) else content:
            text = encode_text(tok, part["text"])
            if part["type"] == "text":
                add(text, 1)
            elif part["type"] == "python":
                add([sp.python_start, *text, sp.python_end], 1)
            else:  # the tool's output is given at inference time, never predicted
                add([sp.output_start, *text, sp.output_end], 0)
        add([sp.assistant_end], 1)
    return ids, mask


def render_prompt(tok, messages, where: str = "conversation") -> list[int]:
    """The ids that prime the assistant's next reply: a conversation ending with the user, then
    <|assistant_start|>."""
    validate(messages, where, final="user")
    ids, _ = render(tok, messages, where)
    return ids + [Specials.of(tok).assistant_start]


def parse_reply(tok, ids) -> list[dict]:
    """An assistant reply's ids (after <|assistant_start|>, without <|assistant_end|>) as content parts, so
    that rendering them again gives the same ids (a multi-turn chat keeps its tool calls)."""
    sp = Specials.of(tok)
    opens = {sp.python_start: ("python", sp.python_end), sp.output_start: ("python_output", sp.output_end)}
    parts, kind, close, run = [], "text", None, []

    def flush():
        if run:
            parts.append({"type": kind, "text": tok.decode(run)})

    for t in ids:
        if close is None and t in opens:
            flush()
            (kind, close), run = opens[t], []
        elif t == close:
            flush()
            kind, close, run = "text", None, []
        else:
            run.append(t)
    flush()
    if len(parts) == 1 and parts[0]["type"] == "text":
        return parts[0]["text"]
    return parts


def read_conversations(path: str | Path, tok, max_len: int) -> list[tuple[list[int], list[int]]]:
    """Rendered (ids, mask) of every conversation in a .jsonl or .parquet file; a bad one (malformed JSON,
    unknown role, turns out of order, empty content, more than `max_len` tokens) is a ConfigError with its
    line (or parquet row) number."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no conversation file at {path}: pass a .jsonl or .parquet file of "
                          f'{{"messages": [{{"role": ..., "content": ...}}]}} records')
    out = []
    for where, record in _records(path):
        if not isinstance(record, dict) or "messages" not in record:
            raise ConfigError(f"{where}: expected an object with a 'messages' list")
        ids, mask = render(tok, record["messages"], where)
        if len(ids) > max_len:
            raise ConfigError(f"{where}: the conversation is {len(ids)} tokens, longer than the context of "
                              f"{max_len}: shorten or drop it (conversations are never split)")
        out.append((ids, mask))
    if not out:
        raise ConfigError(f"{path} holds no conversations")
    return out


def _records(path: Path):
    """(where, record) of each conversation in a file, `where` naming its line or row."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError(f"reading {path} needs pyarrow: pip install 'jaxchat[datasets]'") from None
        for i, record in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path} row {i}", record
        return
    if path.suffix != ".jsonl":
        raise ConfigError(f"{path}: conversations are read from .jsonl or .parquet files")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path} line {n}", json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno})") from None


def pack_conversations(convs, row_len: int, bos_id: int, buffer_size: int = PACK_BUFFER) -> tuple[np.ndarray,
                                                                                                  np.ndarray]:
    """Best-fit packing of whole conversations into (rows, masks), both (num_rows, row_len) int32.

    A buffer holds the next `buffer_size` conversations (nanochat's 100): the largest buffered one that still
    fits the open row whole goes next (ties to the earliest); when none fits, the row is padded with BOS at
    mask 0 and closed. Every conversation lands in exactly one row, unsplit; none is dropped."""
    stream = iter(convs)
    buffer: list = []
    rows, masks = [], []

    def refill():
        for conv in itertools.islice(stream, buffer_size - len(buffer)):
            if len(conv[0]) > row_len:
                raise ConfigError(f"a conversation of {len(conv[0])} tokens cannot fit a row of {row_len}")
            buffer.append(conv)

    while True:
        refill()
        if not buffer:
            break
        row, mrow = [], []
        while True:
            refill()  # (before every pick, as nanochat does)
            room = row_len - len(row)
            fits = [j for j, (ids, _) in enumerate(buffer) if len(ids) <= room]
            if not fits:
                break
            ids, mask = buffer.pop(max(fits, key=lambda j: (len(buffer[j][0]), -j)))
            row += ids
            mrow += mask
        pad = row_len - len(row)
        rows.append(row + [bos_id] * pad)
        masks.append(mrow + [0] * pad)
    return np.asarray(rows, np.int32).reshape(-1, row_len), np.asarray(masks, np.int32).reshape(-1, row_len)


def inputs_targets(rows: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of packed rows: targets are the next tokens, -1 (ignored by the loss) wherever the
    next token is not trained on."""
    targets = np.where(masks[:, 1:] == 1, rows[:, 1:], -1)
    return rows[:, :-1], targets.astype(np.int32)
