"""`jaxchat chat`: a multi-turn chat in the terminal, the reply streamed as it is generated.

Commands: /clear forgets the conversation, /temperature T sets the sampling temperature (0 = greedy),
/quit (or Ctrl-D) ends. A turn that would not fit the model's context is refused with a message and
forgotten; the conversation so far is kept.
"""

from __future__ import annotations

import sys
from dataclasses import replace

from jaxchat.chat.engine import Engine, Sampling
from jaxchat.chat.reply import Reply, prompt_ids, stream_reply
from jaxchat.config import ConfigError

HELP = "/clear starts over, /temperature T sets the temperature (0 = greedy), /quit or Ctrl-D ends"


def chat(engine: Engine, sampling: Sampling, max_tokens: int, seed: int = 0, read=input, out=None) -> None:
    """Run the chat until /quit or end of input; `read` and `out` (default: sys.stdout as it is at the call)
    are the terminal, replaceable in tests."""
    out = out or sys.stdout
    messages: list[dict] = []
    out.write(f"jaxchat chat: {HELP}\n")
    while True:
        try:
            line = read("\nyou> ").strip()
        except EOFError:
            out.write("\n")
            return
        if not line:
            continue
        if line.startswith("/"):
            if line.split()[0] == "/quit":
                return
            messages, sampling = _command(line, messages, sampling, out)
            continue
        messages.append({"role": "user", "content": line})
        try:
            prompt_ids(engine, messages)  # refuse a turn that does not fit before printing anything
        except ConfigError as e:
            out.write(f"{e}\n")
            messages.pop()
            continue
        reply = _reply(engine, messages, sampling, max_tokens, seed + len(messages), out)
        if reply.content:
            messages.append({"role": "assistant", "content": reply.content})
        else:  # an empty reply cannot be rendered back: forget the turn
            out.write("(no reply)\n")
            messages.pop()


def _reply(engine, messages, sampling, max_tokens, seed, out) -> Reply:
    out.write("assistant> ")
    out.flush()
    for piece in stream_reply(engine, messages, sampling, max_tokens, seed):
        if isinstance(piece, Reply):
            out.write("\n" if piece.finish == "stop" else " [max tokens]\n")
            return piece
        out.write(piece)
        out.flush()


def _command(line: str, messages, sampling, out):
    """(messages, sampling) after a slash command."""
    name, *rest = line.split()
    if name == "/clear":
        out.write("(conversation cleared)\n")
        return [], sampling
    if name == "/temperature" and len(rest) == 1:
        try:
            sampling = replace(sampling, temperature=float(rest[0]))
        except (ValueError, ConfigError):
            out.write(f"/temperature takes a number >= 0, not {rest[0]!r}\n")
            return messages, sampling
        out.write(f"(temperature {sampling.temperature})\n")
        return messages, sampling
    out.write(f"unknown command {line!r}: {HELP}\n")
    return messages, sampling
