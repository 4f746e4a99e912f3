"""One assistant reply to a conversation, streamed as text: what the terminal chat and the server share.

The reply's tokens are shown as text with a tool call written the way GSM8K writes calculator calls: the model's
expression in `<<...>>` and the tool's result after `=`, e.g. `<<2+3>>=5`. Text only ever grows at its end
(a token that ends inside a multi-byte character is held back until the character is complete), so it can be
streamed as deltas.
"""

from __future__ import annotations

from dataclasses import dataclass

from jaxchat.chat.conversation import Specials, parse_reply, render_prompt
from jaxchat.chat.engine import Engine, Generation, Sampling
from jaxchat.config import ConfigError


@dataclass
class Reply:
    """The finished reply: `content` for the conversation history (a string, or parts with tool calls), the
    display `text`, why it ended ("stop" | "length"), and the prompt and reply token counts."""

    content: str | list[dict]
    text: str
    finish: str
    prompt_tokens: int
    tokens: int


def display(tok, ids: list[int]) -> str:
    """The reply's tokens as text, tool calls as `<<expr>>=result`: each special token stands for a fixed piece
    of text, so the display only grows as tokens come."""
    sp = Specials.of(tok)
    marks = {sp.python_start: "<<", sp.python_end: ">>", sp.output_start: "=", sp.output_end: ""}
    pieces, run = [], []
    for t in ids:
        if t in marks:
            pieces += [tok.decode(run), marks[t]]
            run = []
        else:
            run.append(t)
    pieces.append(tok.decode(run))
    return "".join(pieces)


def prompt_ids(engine: Engine, messages: list[dict], where: str = "conversation") -> list[int]:
    """The prompt for the assistant's next reply; a ConfigError if the conversation is malformed or fills the
    model's context (checked before any generation, so a server can answer 400 before it streams)."""
    ids = render_prompt(engine.tok, messages, where)
    if len(ids) >= engine.context:
        raise ConfigError(f"the conversation is {len(ids)} tokens and fills the model's context of "
                          f"{engine.context}: start a new conversation (or drop earlier turns)")
    return ids


def stream_reply(engine: Engine, messages: list[dict], sampling: Sampling, max_tokens: int, seed: int = 0,
                 chunk: int = 4):
    """Yield the reply's text in pieces as it is generated, then the finished `Reply`."""
    tok, sp = engine.tok, engine.specials
    prompt = prompt_ids(engine, messages)
    ids: list[int] = []
    sent = ""
    for item in engine.stream(prompt, 1, max_tokens, sampling, seed, stop_ids=(sp.assistant_end, sp.bos),
                              chunk=chunk):
        if isinstance(item, Generation):
            text = display(tok, ids)
            if len(text) > len(sent):
                yield text[len(sent):]
            yield Reply(parse_reply(tok, ids) if ids else "", text, item.finish[0], len(prompt), len(ids))
            return
        ids += item[0]
        text = display(tok, ids).rstrip("\ufffd")  # hold back a character still being written
        if text.startswith(sent) and len(text) > len(sent):
            yield text[len(sent):]
            sent = text
