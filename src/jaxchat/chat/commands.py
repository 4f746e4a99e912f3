"""`jaxchat chat | serve | sft`: argparse wiring. cli.py registers these with `add_parsers(subparsers)`.

Errors a user can cause (no run, a tokenizer without chat tokens, a port in use) raise ConfigError or
CheckpointError, which the CLI prints as one line.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jaxchat.argtypes import count_int, finite_non_negative, positive_int
from jaxchat.chat.conversation import Specials
from jaxchat.chat.engine import Engine, Sampling
from jaxchat.chat.server import ChatService, make_server
from jaxchat.chat.sft import run_sft
from jaxchat.chat.terminal import chat
from jaxchat.config import ConfigError
from jaxchat.run import load_run


def _load(args):
    """(engine, sampling) for a run's checkpoint."""
    cfg, fns, params, tok, step = load_run(args.run, args.step)
    Specials.of(tok)  # refuse a tokenizer without the chat tokens before anything compiles
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    print(f"{args.run} step {step}: {cfg.model.n_layer} layers, context {cfg.model.sequence_len}", file=sys.stderr)
    return Engine(fns, params, tok), sampling


def cmd_chat(args) -> None:
    engine, sampling = _load(args)
    chat(engine, sampling, args.max_tokens, args.seed)


def cmd_serve(args) -> None:
    engine, sampling = _load(args)
    service = ChatService(engine, Path(args.run).name, sampling, args.max_tokens)
    server = make_server(service, args.host, args.port)
    host, port = server.server_address[:2]
    print(f"jaxchat serve: chat at http://{host}:{port}/ , API at http://{host}:{port}/v1/chat/completions "
          f"(Ctrl-C stops)", file=sys.stderr)
    try:
        server.serve_forever()
    finally:
        server.server_close()


def cmd_sft(args) -> None:
    if not args.resume and not (args.from_run and args.data):
        raise ConfigError("jaxchat sft needs --from RUN and --data FILE... (or --resume to continue --out)")
    run_sft(args.from_run, args.data or [], args.out, val=args.val or [], steps=args.steps,
            eval_every=args.eval_every, save_every=args.save_every, resume=args.resume, force=args.force)


def _common(p, temperature: float) -> None:
    p.add_argument("--run", required=True, help="run directory (a chat model: `jaxchat sft`, or any jaxchat run)")
    p.add_argument("--step", type=int, help="checkpoint step (default: latest)")
    p.add_argument("--temperature", type=finite_non_negative, default=temperature, help="0 = greedy")
    p.add_argument("--top-k", type=count_int, default=50, help="keep the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="keep the most likely tokens up to this mass (1 = all)")
    p.add_argument("--max-tokens", type=positive_int, default=512, help="most tokens in one reply")
    p.add_argument("--seed", type=int, default=0)


def add_parsers(sub) -> None:
    c = sub.add_parser("chat", help="chat with a run's model in the terminal (/clear, /temperature T, /quit)")
    _common(c, temperature=0.6)
    c.set_defaults(fn=cmd_chat)

    s = sub.add_parser("serve", help="a web chat page and an OpenAI-compatible /v1/chat/completions endpoint")
    _common(s, temperature=0.8)
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (0 picks a free one)")
    s.set_defaults(fn=cmd_serve)

    f = sub.add_parser("sft", help="fine-tune a pretrained run on conversations (nanochat's SFT recipe)")
    f.add_argument("--from", dest="from_run", metavar="RUN", help="the pretrained run directory")
    f.add_argument("--data", nargs="+", metavar="SOURCE",
                   help=".jsonl/.parquet files of {messages: [...]} records; FILE:W weighs a source in the mixture "
                        "(W x its conversations, e.g. 2 or 0.5; default 1)")
    f.add_argument("--out", required=True, metavar="RUN2", help="the new run directory")
    f.add_argument("--val", nargs="+", metavar="SOURCE",
                   help="held-out conversations (default: every 20th conversation of each --data source)")
    f.add_argument("--steps", type=count_int, default=0, help="optimizer steps (default 0: one epoch)")
    f.add_argument("--eval-every", type=count_int, default=0, help="evaluate every N steps (0: start and end only)")
    f.add_argument("--save-every", type=count_int, default=0, help="checkpoint every N steps (0: the end only)")
    f.add_argument("--resume", action="store_true", help="continue the SFT run in --out from its latest checkpoint")
    f.add_argument("--force", action="store_true", help="delete an existing run in --out and start over")
    f.set_defaults(fn=cmd_sft)
