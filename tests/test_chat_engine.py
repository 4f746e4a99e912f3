"""The decode engine against the full forward, its stop tokens, sampling and tool calls; the terminal chat; the
HTTP server through a real client.

Two models: the tiny-micro GPT with noise added to its init (so attention, smear and value embeddings all carry
signal), for exactness; and a scripted stand-in with the same public interface that writes a fixed token
sequence, for the control flow (tools, stops, streaming) where the text must be known in advance.
"""

import argparse
import io
import json
import os
import threading
import urllib.error
import urllib.request
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchat.chat.conversation import Specials
from jaxchat.chat.engine import Engine, Sampling
from jaxchat.chat.server import ChatService, make_server
from jaxchat.chat.terminal import chat
from jaxchat.config import ConfigError
from jaxchat.overrides import apply_overrides
from jaxchat.data.tokenizer import Tokenizer
from jaxchat.presets import get_preset
from jaxchat.train import ModelFns

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "tiny-micro-20.json")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([open(m.__file__).read() for m in (os, argparse)], 512)


@pytest.fixture(scope="module")
def gpt(tok):
    """(fns, params, engine) of the tiny-micro model, init plus noise."""
    cfg = apply_overrides(get_preset("tiny"), json.load(open(GOLDEN))["set"])
    fns = ModelFns(cfg)
    leaves, tree = jax.tree.flatten(fns.init_params(0))
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    return fns, params, Engine(fns, params, tok)


class Scripted:
    """A stand-in model: at position p its logits pick script[p + 1], whatever it was fed."""

    def __init__(self, script, vocab):
        self.script, self.vocab = script, vocab

    def init_cache(self, batch, max_len):
        return {"pos": jnp.int32(0), "fed": jnp.zeros((batch, max_len), jnp.int32)}

    def __call__(self, idx, cache=None):
        B, T = idx.shape
        pos = cache["pos"] + jnp.arange(T)
        nxt = self.script[jnp.minimum(pos + 1, self.script.shape[0] - 1)]
        logits = 20.0 * jax.nn.one_hot(nxt, self.vocab)[None].repeat(B, axis=0)
        fed = jax.lax.dynamic_update_slice(cache["fed"], idx, (0, cache["pos"]))
        return logits, {"pos": cache["pos"] + T, "fed": fed}


def scripted_engine(tok, prompt, reply, context=64):
    script = jnp.asarray(prompt + reply + [0] * (context - len(prompt) - len(reply)), jnp.int32)
    fns = SimpleNamespace(cfg=SimpleNamespace(model=SimpleNamespace(sequence_len=context)),
                          module=lambda params: Scripted(params["script"], tok.vocab_size))
    return Engine(fns, {"script": script}, tok)


# ------------------------------------------------------------------------------------------------------------
# exactness on the real model


def test_compiled_decode_equals_stepwise_full_forward(gpt, tok):
    fns, params, engine = gpt
    prompt = [tok.bos_id] + tok.encode("def main(argv):\n    return")
    out = engine.generate(prompt, num_samples=2, max_tokens=24, sampling=Sampling(0.0), record=True)
    assert out.tokens[0] == out.tokens[1] and len(out.tokens[0]) == 24 and out.finish == ["length"] * 2
    # the full forward, one compile: the sequence right-padded to the context (causal, so the pads are unseen)
    forward = jax.jit(lambda p, x, n: fns.module(p)(x)[0, n - 1])
    seq, prev = list(prompt), None
    for j, t in enumerate(out.tokens[0]):
        want = np.asarray(forward(params, jnp.asarray([seq + [0] * (64 - len(seq))], jnp.int32), len(seq)))
        if prev is not None:  # a comparison against a trivial value proves nothing: the logits move step to step
            assert np.abs(want - prev).max() > 0.1
        np.testing.assert_allclose(out.logits[0, j], want, rtol=0, atol=1e-4)
        np.testing.assert_allclose(out.logits[1, j], want, rtol=0, atol=1e-4)
        assert t == int(np.argmax(want))
        seq.append(t)
        prev = want


@pytest.mark.slow
def test_decode_with_a_sliding_window_and_gqa_equals_the_full_forward():
    """Windows bind (a 256-token window, 290 positions), GQA (2 heads, 1 kv head), tied embeddings: one full
    forward over prompt + reply gives the logits of every step (causality)."""
    cfg = apply_overrides(get_preset("tiny"), [
        "model.n_layer=3", "model.n_embd=64", "model.n_head=2", "model.n_kv_head=1", "model.sequence_len=1024",
        "model.vocab_size=512", "data.tokenizer_vocab=512", "model.window_pattern=SL", "model.tie_embeddings=true"])
    assert cfg.model.window_sizes() == (256, 1024, 1024)
    fns = ModelFns(cfg)
    leaves, tree = jax.tree.flatten(fns.init_params(0))
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    prompt = np.random.default_rng(0).integers(0, 500, 230).tolist()
    out = Engine(fns, params).generate(prompt, 2, 60, Sampling(0.0), record=True)
    logits = np.asarray(fns.module(params)(jnp.asarray([prompt + out.tokens[0]]))[0])
    want = logits[len(prompt) - 1: len(prompt) - 1 + 60]
    np.testing.assert_allclose(out.logits[0], want, rtol=0, atol=1e-4)
    assert out.tokens[0] == want.argmax(-1).tolist()


def test_stop_tokens_end_a_row(gpt, tok):
    _, _, engine = gpt
    prompt = [tok.bos_id] + tok.encode("import os")
    free = engine.generate(prompt, 2, max_tokens=12, sampling=Sampling(0.0)).tokens[0]
    stop = free[5]
    first = free.index(stop)
    out = engine.generate(prompt, 2, max_tokens=12, sampling=Sampling(0.0), stop_ids=(stop,))
    assert out.tokens == [free[:first]] * 2 and out.finish == ["stop"] * 2


def test_sampling_is_seeded_and_truncation_narrows_it(gpt, tok):
    _, _, engine = gpt
    prompt = [tok.bos_id] + tok.encode("class ")
    hot = Sampling(1.0)
    a = engine.generate(prompt, 2, 16, hot, seed=7).tokens
    assert a == engine.generate(prompt, 2, 16, hot, seed=7).tokens
    assert a != engine.generate(prompt, 2, 16, hot, seed=8).tokens
    assert a[0] != a[1]  # rows are independent samples
    greedy = engine.generate(prompt, 2, 16, Sampling(0.0)).tokens[0]
    assert greedy not in a
    assert engine.generate(prompt, 2, 16, Sampling(1.0, top_k=1), seed=3).tokens == [greedy] * 2
    assert engine.generate(prompt, 2, 16, Sampling(1.0, top_p=1e-6), seed=3).tokens == [greedy] * 2


def test_streaming_gives_the_same_tokens_in_chunks(gpt, tok):
    _, _, engine = gpt
    prompt = [tok.bos_id] + tok.encode("for x in")
    whole = engine.generate(prompt, 2, 20, Sampling(0.9, top_k=40), seed=1)
    *pieces, result = engine.stream(prompt, 2, 20, Sampling(0.9, top_k=40), seed=1, chunk=3)
    assert len(pieces) == 7 and all(len(p[0]) <= 3 for p in pieces)
    assert [sum((p[r] for p in pieces), []) for r in range(2)] == whole.tokens == result.tokens


def test_prompt_filling_the_context_is_refused(gpt, tok):
    _, _, engine = gpt
    with pytest.raises(ConfigError, match="fills the model's context of 64"):
        engine.generate([tok.bos_id] * 64, 2, max_tokens=4)
    out = engine.generate([tok.bos_id] * 60, 2, max_tokens=50, sampling=Sampling(0.0))
    assert len(out.tokens[0]) == 4 and out.finish == ["length"] * 2  # generation stops at the context


# ------------------------------------------------------------------------------------------------------------
# tool calls and chat control flow on the scripted model


def chat_prompt(tok, text):
    sp = Specials.of(tok)
    return [sp.bos, sp.user_start, *tok.encode(text), sp.user_end, sp.assistant_start]


def test_tool_call_forces_the_calculator_result(tok):
    sp = Specials.of(tok)
    prompt = chat_prompt(tok, "what is 12*3?")
    # the script's tokens where the forced output goes are junk: forced tokens must win over them
    junk = tok.encode("zzzz")[:1] * 4
    reply = [*tok.encode("it is "), sp.python_start, *tok.encode("12*3"), sp.python_end, *junk,
             *tok.encode(" so"), sp.assistant_end]
    engine = scripted_engine(tok, prompt, reply)
    out = engine.generate(prompt, 2, 40, Sampling(0.0), stop_ids=(sp.assistant_end,))
    result = [sp.output_start, *tok.encode("36"), sp.output_end]
    n = len(result)
    start = len(tok.encode("it is ")) + 2 + len(tok.encode("12*3"))
    expected = reply[:start] + result + reply[start + n:-1]
    assert out.tokens == [expected, expected] and out.finish == ["stop", "stop"]


def test_refused_tool_call_forces_nothing(tok):
    sp = Specials.of(tok)
    prompt = chat_prompt(tok, "hack")
    reply = [sp.python_start, *tok.encode("open('x')"), sp.python_end, *tok.encode(" no"), sp.assistant_end]
    engine = scripted_engine(tok, prompt, reply)
    assert engine.generate(prompt, 1, 40, Sampling(0.0), stop_ids=(sp.assistant_end,)).tokens == [reply[:-1]]


def test_terminal_chat_streams_and_obeys_commands(tok):
    sp = Specials.of(tok)
    prompt = chat_prompt(tok, "hi")
    engine = scripted_engine(tok, prompt, [*tok.encode("hello there"), sp.assistant_end])
    lines = iter(["hi", "/temperature 0", "/temperature hot", "/bogus", "/clear", "hi", "/quit", "never read"])
    out = io.StringIO()
    chat(engine, Sampling(0.0), 16, read=lambda _: next(lines), out=out)
    text = out.getvalue()
    assert text.count("assistant> hello there\n") == 2  # /clear made the second "hi" a first turn again
    assert "(temperature 0.0)" in text and "takes a number >= 0, not 'hot'" in text
    assert "unknown command '/bogus'" in text and "(conversation cleared)" in text
    assert next(lines) == "never read"


# ------------------------------------------------------------------------------------------------------------
# the HTTP server


@pytest.fixture(scope="module")
def server(tok):
    sp = Specials.of(tok)
    prompt = chat_prompt(tok, "hi")
    engine = scripted_engine(tok, prompt, [*tok.encode("hello "), sp.python_start, *tok.encode("1+1"),
                                           sp.python_end, 0, 0, 0, *tok.encode(" ok"), sp.assistant_end])
    srv = make_server(ChatService(engine, "scripted", Sampling(0.0), 32), port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def post(url, body):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def test_server_answers_a_request(server):
    status, kind, body = post(server, {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 200 and kind == "application/json"
    reply = json.loads(body)
    assert reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": "hello <<1+1>>=2 ok"}
    assert reply["choices"][0]["finish_reason"] == "stop"
    assert reply["usage"]["completion_tokens"] > 0


def test_server_streams(server):
    status, kind, body = post(server, {"messages": [{"role": "user", "content": "hi"}], "stream": True})
    assert status == 200 and kind == "text/event-stream"
    events = [e.removeprefix("data: ") for e in body.strip().split("\n\n")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    deltas = [c["choices"][0]["delta"].get("content", "") for c in chunks]
    assert len([d for d in deltas if d]) > 1  # streamed in pieces
    assert "".join(deltas) == "hello <<1+1>>=2 ok"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("body, message", [
    (b"{not json", "not valid JSON"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "role 'wizard'"),
    ({"messages": [{"role": "user", "content": ""}]}, "empty content"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, "should be from assistant"),
    ({"messages": [{"role": "user", "content": "word " * 100}]}, "fills the model's context"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "'temperature' must be a number >= 0"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "'stream' must be true or false"),
    ({"prompt": "hi"}, "'messages' must be a non-empty list"),
])
def test_server_refuses_a_malformed_request(server, body, message):
    status, kind, text = post(server, body)
    assert status == 400 and kind == "application/json"
    error = json.loads(text)["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"


def test_server_serves_the_page(server):
    with urllib.request.urlopen(server + "/", timeout=10) as r:
        assert r.status == 200 and "/v1/chat/completions" in r.read().decode()
