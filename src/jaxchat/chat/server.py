"""`jaxchat serve`: a one-page web chat and an OpenAI-compatible `/v1/chat/completions`, on the stdlib's
`http.server` (no web framework: the API is three routes).

Routes:
- `GET /`: the chat page (ui.py), which talks to the endpoint below with `stream: true`;
- `GET /health`, `GET /v1/models`: liveness and the one model served;
- `POST /v1/chat/completions`: OpenAI's request shape (`messages`, `max_tokens`, `temperature`, `top_p`, `seed`,
  `stream`, plus nanochat's `top_k`); the reply is one `chat.completion` object, or with `stream: true`
  server-sent events of `chat.completion.chunk` objects ending with `data: [DONE]`.
A malformed request (bad JSON, unknown role, empty content, a conversation longer than the context, a value
out of range) is answered 400 with `{"error": {"message": ..., "type": "invalid_request_error"}}` before any
generation. One reply is generated at a time (a lock): the engine holds one KV cache's worth of memory.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from jaxchat.chat.conversation import validate
from jaxchat.chat.engine import Engine, Sampling
from jaxchat.chat.reply import Reply, prompt_ids, stream_reply
from jaxchat.chat.ui import PAGE
from jaxchat.config import ConfigError

MAX_BODY = 1 << 20  # bytes of one request


class BadRequest(Exception):
    """A request the server answers with HTTP 400 and this message."""


class ChatService:
    """The model behind the server: defaults for the request's sampling fields, and the generation lock."""

    def __init__(self, engine: Engine, model_name: str, sampling: Sampling, max_tokens: int):
        self.engine, self.model_name = engine, model_name
        self.sampling, self.max_tokens = sampling, max_tokens
        self.lock = threading.Lock()

    def parse(self, body: bytes) -> dict:
        """The checked request: messages, sampling, max_tokens, seed, stream; BadRequest says what is wrong."""
        try:
            req = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"the body is not valid JSON: {e}") from None
        if not isinstance(req, dict):
            raise BadRequest("the body must be a JSON object with a 'messages' list")
        try:
            messages = req.get("messages")
            validate(messages, "messages", final="user")
            if any(not isinstance(m["content"], str) for m in messages):
                raise BadRequest("messages: every content must be a string")
            sampling = replace(self.sampling, temperature=_number(req, "temperature", self.sampling.temperature),
                               top_p=_number(req, "top_p", self.sampling.top_p),
                               top_k=int(_number(req, "top_k", self.sampling.top_k, integer=True)))
            out = {"messages": messages, "sampling": sampling, "stream": req.get("stream", False),
                   "max_tokens": int(_number(req, "max_tokens", self.max_tokens, integer=True, low=1)),
                   "seed": int(_number(req, "seed", 0, integer=True, low=None))}
            if not isinstance(out["stream"], bool):
                raise BadRequest("'stream' must be true or false")
            if req.get("n", 1) != 1:
                raise BadRequest("only n=1 is served")
            out["prompt_tokens"] = len(prompt_ids(self.engine, messages, "messages"))
        except ConfigError as e:
            raise BadRequest(str(e)) from None
        return out

    def completion(self, req: dict) -> dict:
        with self.lock:
            *_, reply = stream_reply(self.engine, req["messages"], req["sampling"], req["max_tokens"], req["seed"])
        return {**self._envelope("chat.completion"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                             "finish_reason": reply.finish}],
                "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.tokens,
                          "total_tokens": reply.prompt_tokens + reply.tokens}}

    def chunks(self, req: dict):
        """The streamed reply as `chat.completion.chunk` objects."""
        head = self._envelope("chat.completion.chunk")
        yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}
        with self.lock:
            for piece in stream_reply(self.engine, req["messages"], req["sampling"], req["max_tokens"], req["seed"]):
                if isinstance(piece, Reply):
                    yield {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": piece.finish}]}
                else:
                    yield {**head, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}

    def _envelope(self, kind: str) -> dict:
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": kind, "created": int(time.time()),
                "model": self.model_name}


def _number(req: dict, key: str, default, integer: bool = False, low: float | None = 0):
    value = req.get(key, default)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or (low is not None and value < low):
        kind = "an integer" if integer else "a number"
        raise BadRequest(f"'{key}' must be {kind}" + (f" >= {low}" if low is not None else "") + f", not {value!r}")
    return value


def make_handler(service: ChatService):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            if self.path == "/":
                self._send(200, PAGE.encode(), "text/html; charset=utf-8")
            elif self.path == "/health":
                self._json(200, {"status": "ok"})
            elif self.path == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": service.model_name, "object": "model",
                                                             "owned_by": "jaxchat"}]})
            else:
                self._error(404, f"no route GET {self.path}: try / or POST /v1/chat/completions")

        def do_POST(self):
            if self.path != "/v1/chat/completions":
                self._error(404, f"no route POST {self.path}: the endpoint is /v1/chat/completions")
                return
            length = self.headers.get("Content-Length") or "0"
            if not length.isdigit():
                self._error(400, f"Content-Length {length!r} is not a byte count")
                return
            length = int(length)
            if length > MAX_BODY:
                self._error(413, f"the body is {length} bytes; at most {MAX_BODY} are read")
                return
            try:
                req = service.parse(self.rfile.read(length))
            except BadRequest as e:
                self._error(400, str(e))
                return
            if not req["stream"]:
                self._json(200, service.completion(req))
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")  # the stream's end is the connection's end
            self.end_headers()
            self.close_connection = True
            try:
                for chunk in service.chunks(req):
                    self._event(json.dumps(chunk))
                self._event("[DONE]")
            except (BrokenPipeError, ConnectionResetError):
                return  # the client went away: stop generating for it

        def _event(self, data: str):
            self.wfile.write(f"data: {data}\n\n".encode())
            self.wfile.flush()

        def _json(self, status: int, obj: dict):
            self._send(status, json.dumps(obj).encode(), "application/json")

        def _error(self, status: int, message: str):
            self._json(status, {"error": {"message": message, "type": "invalid_request_error"}})

        def _send(self, status: int, body: bytes, kind: str):
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


def make_server(service: ChatService, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """The HTTP server (not yet serving); port 0 picks a free port (server.server_address has it)."""
    try:
        return ThreadingHTTPServer((host, port), make_handler(service))
    except OSError as e:
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}): pick another --port") from None
