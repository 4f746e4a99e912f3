"""nanochat's chat evals (evals/chat_tasks.py, chat_eval.py) on small task files in the datasets' own layouts, scored
by a model whose answers are known in advance (evals_support.py):
- at <|assistant_start|> its logits favour "B" among the letters A-D (and <|python_start|> over everything), so a
  multiple-choice answer is "B" whenever B is offered, else the first letter (all tied);
- from <|python_start|> it writes "3*4", closes the call, and after the calculator's output writes " #### 12" and
  ends its turn; so every GSM8K answer is 12, and right only where the reference is 12.
"""

import io
import json
from contextlib import redirect_stdout

import numpy as np
import pytest

from evals_support import tokenizer, write_bigram_run
from jaxchat.chat.conversation import Specials
from jaxchat.chat.engine import Engine, Sampling
from jaxchat.cli import main
from jaxchat.config import ConfigError
from jaxchat.evals import chat_tasks
from jaxchat.evals.chat_eval import categorical_accuracy, centered_mean, prompt_ids
from jaxchat.evals.scoring import Scorer
from jaxchat.run import Run


def arc(q, labels, key):
    return {"id": q, "question": q, "choices": {"text": [f"choice {x}" for x in labels], "label": labels},
            "answerKey": key}


ARC = [arc("Which?", list("ABCD"), "B"),  # right (B)
       arc("What?", list("ABCD"), "C"),  # wrong (B)
       arc("Numbered?", list("1234"), "1"),  # right: no letter is favoured, the first wins
       arc("Three?", list("ABC"), "B")]  # right
MMLU = [{"question": "m1", "choices": ["w", "x", "y", "z"], "answer": 1, "subject": "s"},  # right
        {"question": "m2", "choices": ["w", "x", "y", "z"], "answer": 0, "subject": "s"}]  # wrong
GSM = [{"question": "What is 3*4?", "answer": "Three fours: <<3*4=12>>12.\n#### 12"},  # right
       {"question": "What is 3*5?", "answer": "Three fives: <<3*5=15>>15.\n#### 15"}]  # wrong
# by hand: ARC-Easy 3/4, MMLU 1/2, GSM8K 1/2; centered on 0.25, 0.25, 0
EXPECTED = {"ARC-Easy": 0.75, "MMLU": 0.5, "GSM8K": 0.5}
EXPECTED_CENTERED = ((0.75 - 0.25) / 0.75 + (0.5 - 0.25) / 0.75 + 0.5) / 3


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_data(root):
    write_jsonl(root / "allenai/ai2_arc/ARC-Easy/test.jsonl", ARC)
    write_jsonl(root / "cais/mmlu/all/test.jsonl", MMLU)
    write_jsonl(root / "openai/gsm8k/main/test.jsonl", GSM)
    return root


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


@pytest.fixture(scope="module")
def run_dir(tok, tmp_path_factory):
    sp = Specials.of(tok)
    enc = {s: tok.encode(s) for s in ("B", "3", "*", "4", " ####", " ", "12")}
    assert all(len(v) == 1 for v in enc.values()), enc  # one token each, so the chain below is a bigram table
    i = {s: v[0] for s, v in enc.items()}
    chain = [sp.python_start, i["3"], i["*"], i["4"], sp.python_end]
    table = {sp.assistant_start: {sp.python_start: 8.0, i["B"]: 6.0}}
    table.update({a: {b: 8.0} for a, b in zip(chain, chain[1:])})
    answer = [sp.output_end, i[" ####"], i[" "], i["12"], sp.assistant_end]
    table.update({a: {b: 8.0} for a, b in zip(answer, answer[1:])})
    assert len(table) == len(chain) + len(answer) - 1  # no token has two successors
    return write_bigram_run(tmp_path_factory.mktemp("chat") / "run", tok, table, {})


@pytest.fixture(scope="module")
def run(run_dir):
    return Run.load(run_dir)


def test_multiple_choice_compares_the_letters_logits(tmp_path, run):
    data = make_data(tmp_path)
    sc = Scorer(run.fns, run.params, run.tokenizer.bos_id, batch_size=3)
    for name in ("ARC-Easy", "MMLU"):
        convs = chat_tasks.load_task(name, data)
        assert categorical_accuracy(sc, run.tokenizer, convs, name) == EXPECTED[name]


def test_gsm8k_generates_with_the_calculator(tmp_path, run):
    data = make_data(tmp_path)
    tok = run.tokenizer
    engine = Engine(run.fns, run.params, tok)
    convs = chat_tasks.load_task("GSM8K", data)
    # (the score of both problems, 1/2, is checked through the command line below, on the same compiled loop)
    # the calculator, not the model, wrote "12" between <|output_start|> and <|output_end|>
    sp = Specials.of(tok)
    gen = engine.generate(prompt_ids(tok, convs[0], "x"), 1, 24, Sampling(temperature=0.0, top_k=50),
                          stop_ids=(sp.assistant_end,))
    text = tok.decode(gen.tokens[0])
    assert text == "<|python_start|>3*4<|python_end|><|output_start|>12<|output_end|> #### 12", text
    assert chat_tasks.extract_answer(text) == "12"
    assert [chat_tasks.gsm8k_correct(c, text) for c in convs] == [c["messages"][0]["content"] == "What is 3*4?"
                                                                   for c in convs]


def test_cli_runs_the_tasks_and_prints_the_centered_mean(tmp_path, run_dir):
    data = make_data(tmp_path / "data")
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(["eval", "--run", str(run_dir), "--chat", "ARC-Easy,MMLU,GSM8K", "--data", str(data),
                   "--max-new-tokens", "24"])
    out = buf.getvalue()
    assert rc == 0, out
    assert "ARC-Easy       accuracy  75.00% (3/4)" in out and "GSM8K          accuracy  50.00% (1/2)" in out
    assert 0 < EXPECTED_CENTERED < 1 and f"centered mean accuracy: {EXPECTED_CENTERED:.4f}" in out
    record = json.loads((run_dir / "evals" / "chat_step000001.json").read_text())
    assert record["chat"]["results"] == EXPECTED
    assert centered_mean(EXPECTED) == pytest.approx(EXPECTED_CENTERED)


def test_tasks_are_nanochats_conversations_in_nanochats_order(tmp_path):
    data = make_data(tmp_path)
    rows = [json.loads(x) for x in (data / "allenai/ai2_arc/ARC-Easy/test.jsonl").read_text().splitlines()]
    convs = chat_tasks.load_task("ARC-Easy", data)
    order = np.random.default_rng(42).permutation(len(rows))  # nanochat's shuffle(seed=42)
    assert [c["messages"][0]["content"].splitlines()[0] for c in convs] == \
        [f"Multiple Choice question: {rows[i]['question']}" for i in order]
    c = next(c for c in convs if "Three?" in c["messages"][0]["content"])
    assert c["messages"][0]["content"] == ("Multiple Choice question: Three?\n- choice A=A\n- choice B=B\n"
                                           "- choice C=C\n\nRespond only with the letter of the correct answer.")
    assert c["messages"][1] == {"role": "assistant", "content": "B"} and c["letters"] == ["A", "B", "C"]
    g = chat_tasks.load_task("GSM8K", data)
    g = next(x for x in g if x["messages"][0]["content"] == "What is 3*4?")
    assert g["messages"][1]["content"] == [
        {"type": "text", "text": "Three fours: "}, {"type": "python", "text": "3*4"},
        {"type": "python_output", "text": "12"}, {"type": "text", "text": "12.\n#### 12"}]
    assert chat_tasks.extract_answer("so #### -1,234.5 apples") == "-1234.5"
    assert chat_tasks.extract_answer("no marker 12") is None


def test_nanochat_cache_layout_and_parquet(tmp_path, run):
    pa = pytest.importorskip("pyarrow", reason="parquet task files need pyarrow (jaxchat[datasets])")
    import pyarrow.parquet as pq
    d = tmp_path / "cais--mmlu" / "all" / "test"
    d.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(MMLU), d / "00000.parquet")
    convs = chat_tasks.load_task("MMLU", tmp_path)
    assert sorted(c["messages"][0]["content"].splitlines()[0] for c in convs) == \
        ["Multiple Choice question: m1", "Multiple Choice question: m2"]
    (d / "00000.parquet").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="not a readable parquet file"):
        chat_tasks.load_task("MMLU", tmp_path)


def test_bad_task_input_is_refused_clearly(tmp_path, run_dir, capsys):
    with pytest.raises(ConfigError, match="unknown chat task 'HellaSwag'.*ARC-Easy"):
        chat_tasks.load_task("HellaSwag", tmp_path)
    with pytest.raises(ConfigError, match=r"no GSM8K data under .*openai/gsm8k/main/test-\*\.parquet.*--download"):
        chat_tasks.load_task("GSM8K", tmp_path)
    write_jsonl(tmp_path / "openai/gsm8k/main/test.jsonl", GSM).write_text(json.dumps(GSM[0]) + "\n{oops\n")
    with pytest.raises(ConfigError, match=r"test.jsonl line 2: not valid JSON"):
        chat_tasks.load_task("GSM8K", tmp_path)
    write_jsonl(tmp_path / "allenai/ai2_arc/ARC-Easy/test.jsonl", [ARC[0], {"question": "no choices"}])
    with pytest.raises(ConfigError, match=r"test.jsonl line 2: not a ARC-Easy row"):
        chat_tasks.load_task("ARC-Easy", tmp_path)
    assert main(["eval", "--run", str(run_dir), "--chat", "ARC-Easy,Nope", "--data", str(tmp_path)]) == 2
    assert "unknown chat task 'Nope'" in capsys.readouterr().err
    assert main(["eval", "--run", str(tmp_path / "missing"), "--chat", "MMLU", "--data", str(make_data(tmp_path))]) == 2
    assert "jaxchat eval: error:" in capsys.readouterr().err


def test_download_writes_the_hub_parquet_export(tmp_path):
    """The download code against a local file:// stand-in for the Hub's parquet listing API."""
    shard = tmp_path / "remote" / "shard0.parquet"
    shard.parent.mkdir()
    shard.write_bytes(b"parquet bytes")
    listing = tmp_path / "api" / "allenai/ai2_arc/parquet/ARC-Challenge/test"
    listing.parent.mkdir(parents=True)
    listing.write_text(json.dumps([shard.as_uri()]))
    paths = chat_tasks.download_task("ARC-Challenge", tmp_path / "data", api=(tmp_path / "api").as_uri())
    assert paths == [tmp_path / "data/allenai/ai2_arc/ARC-Challenge/test-00000-of-00001.parquet"]
    assert paths[0].read_bytes() == b"parquet bytes"
    assert chat_tasks.task_files("ARC-Challenge", tmp_path / "data") == paths
    with pytest.raises(ConfigError, match="could not list MMLU's parquet files"):
        chat_tasks.download_task("MMLU", tmp_path / "data", api=(tmp_path / "api").as_uri())
    assert chat_tasks.HF_API == "https://huggingface.co/api/datasets"
