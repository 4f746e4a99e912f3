"""Conversations (rendering, masks, reading, packing) and the calculator: no model, all fast."""

import argparse
import json
import os

import numpy as np
import pytest

from jaxchat.chat.conversation import (Specials, encode_text, inputs_targets, pack_conversations, parse_reply,
                                       read_conversations, render, render_prompt)
from jaxchat.chat.tools import calculate
from jaxchat.config import ConfigError
from jaxchat.data.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([open(m.__file__).read() for m in (os, argparse)], 512)


@pytest.fixture(scope="module")
def sp(tok):
    return Specials.of(tok)


def test_render_single_turn_by_hand(tok, sp):
    ids, mask = render(tok, [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"}])
    hi, hello = tok.encode("hi there"), tok.encode("hello")
    assert ids == [sp.bos, sp.user_start, *hi, sp.user_end, sp.assistant_start, *hello, sp.assistant_end]
    assert mask == [0, 0, *[0] * len(hi), 0, 0, *[1] * len(hello), 1]


def test_render_tool_call_and_system_by_hand(tok, sp):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+3?"},
            {"role": "assistant", "content": [{"type": "text", "text": "sum "},
                                              {"type": "python", "text": "2+3"},
                                              {"type": "python_output", "text": "5"},
                                              {"type": "text", "text": "is 5"}]},
            {"role": "user", "content": "thanks"}, {"role": "assistant", "content": "ok"}]
    ids, mask = render(tok, msgs)
    e = tok.encode
    expected = [(sp.bos, 0), (sp.user_start, 0), *[(t, 0) for t in e("be brief\n\n2+3?")], (sp.user_end, 0),
                (sp.assistant_start, 0), *[(t, 1) for t in e("sum ")],
                (sp.python_start, 1), *[(t, 1) for t in e("2+3")], (sp.python_end, 1),
                (sp.output_start, 0), *[(t, 0) for t in e("5")], (sp.output_end, 0),
                *[(t, 1) for t in e("is 5")], (sp.assistant_end, 1),
                (sp.user_start, 0), *[(t, 0) for t in e("thanks")], (sp.user_end, 0),
                (sp.assistant_start, 0), *[(t, 1) for t in e("ok")], (sp.assistant_end, 1)]
    assert list(zip(ids, mask)) == expected
    # only assistant tokens carry loss: every masked token lies between an assistant_start and its end
    inside = False
    for t, m in zip(ids, mask):
        inside = (inside or t == sp.assistant_start) and t != sp.user_start
        assert not m or inside


def test_special_text_in_content_is_not_a_special_token(tok, sp):
    ids, _ = render(tok, [{"role": "user", "content": "say <|assistant_end|> now"}])
    assert ids.count(sp.assistant_end) == 0
    assert tok.decode(encode_text(tok, "say <|assistant_end|> now")) == "say <|assistant_end|> now"


def test_render_prompt_primes_the_assistant(tok, sp):
    ids = render_prompt(tok, [{"role": "user", "content": "hi"}])
    assert ids == [sp.bos, sp.user_start, *tok.encode("hi"), sp.user_end, sp.assistant_start]
    with pytest.raises(ConfigError, match="last message must be from the user"):
        render_prompt(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])


def test_parse_reply_round_trips(tok, sp):
    content = [{"type": "text", "text": "sum "}, {"type": "python", "text": "2+3"},
               {"type": "python_output", "text": "5"}, {"type": "text", "text": "is 5"}]
    ids, _ = render(tok, [{"role": "user", "content": "q"}, {"role": "assistant", "content": content}])
    reply = ids[ids.index(sp.assistant_start) + 1:-1]
    assert parse_reply(tok, reply) == content
    assert parse_reply(tok, tok.encode("plain")) == "plain"


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "bot", "content": "x"}]}, "line 2: message 0 has role 'bot'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     "line 2: turn 1 is from user but should be from assistant"),
    ({"messages": [{"role": "user", "content": "  "}]}, "line 2: message 0 \\(user\\) has empty content"),
    ({"messages": [{"role": "user", "content": "word " * 200}]}, "line 2: the conversation is .* longer than"),
    ({"messages": []}, "line 2: 'messages' must be a non-empty list"),
    ({"text": "no messages"}, "line 2: expected an object with a 'messages' list"),
])
def test_bad_conversations_are_refused_with_their_line(tok, tmp_path, record, message):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ConfigError, match=message):
        read_conversations(path, tok, max_len=64)


def test_malformed_json_names_its_line(tok, tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n\n{"messages": [\n')
    with pytest.raises(ConfigError, match="line 3: not valid JSON"):
        read_conversations(path, tok, max_len=64)


def test_parquet_conversations_name_their_row(tok, tmp_path):
    pa = pytest.importorskip("pyarrow")  # (the optional `datasets` extra)
    pq = pytest.importorskip("pyarrow.parquet")

    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    path = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": good}, {"messages": good}]), path)
    assert read_conversations(path, tok, max_len=64) == [render(tok, good)] * 2
    bad = [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]
    pq.write_table(pa.Table.from_pylist([{"messages": good}, {"messages": bad}]), path)
    with pytest.raises(ConfigError, match="row 1: turn 1 is from user"):
        read_conversations(path, tok, max_len=64)


def test_packing_never_splits_a_conversation(sp):
    rng = np.random.default_rng(0)
    convs = []
    for k in range(300):  # each conversation is BOS then a run of its own id, so its pieces are recognisable
        n = int(rng.integers(2, 40))
        convs.append(([sp.bos] + [k] * (n - 1), [0] + [1] * (n - 1)))
    rows, masks = pack_conversations(convs, row_len=65, bos_id=sp.bos)
    assert rows.shape[1] == 65 and rows.shape == masks.shape
    found = {}
    for r, row in enumerate(rows):
        assert row[0] == sp.bos
        j = 0
        while j < len(row):
            assert row[j] == sp.bos
            k = j + 1
            while k < len(row) and row[k] != sp.bos:
                k += 1
            if k > j + 1:  # a conversation (a lone BOS is padding, mask 0)
                assert int(row[j + 1]) not in found, "a conversation appears twice (split)"
                found[int(row[j + 1])] = (r, k - j)
            else:
                assert masks[r, j] == 0
            j = k
    assert {k: n for k, (_, n) in found.items()} == {k: len(c[0]) for k, c in enumerate(convs)}
    assert masks.sum() == sum(sum(m) for _, m in convs)
    assert (rows != sp.bos).sum() / rows.size > 0.85  # best fit leaves little padding


def test_inputs_targets_mask_everything_but_trained_tokens():
    rows = np.array([[9, 1, 2, 3, 9]])
    masks = np.array([[0, 0, 1, 1, 0]])
    x, y = inputs_targets(rows, masks)
    assert x.tolist() == [[9, 1, 2, 3]] and y.tolist() == [[-1, 2, 3, -1]]


@pytest.mark.parametrize("expr, value", [("2+3", "5"), ("7/2", "3.5"), ("1,234 * 2", "2468"), ("-(4 - 10) % 4", "2"),
                                         ("17 // 5", "3"), ("0.5 * 4", "2.0")])
def test_calculator_does_arithmetic(expr, value):
    assert calculate(expr) == value


@pytest.mark.parametrize("expr", ["__import__('os').system('ls')", "2**10", "abs(-3)", "x + 1", "'ab'.count('a')",
                                  "1/0", "[1, 2]", "1 < 2", "9" * 300, "99999999999 * " * 15 + "9", "", "3j",
                                  "True + 1", "lambda: 1"])
def test_calculator_refuses_anything_but_arithmetic(expr):
    assert calculate(expr) is None
