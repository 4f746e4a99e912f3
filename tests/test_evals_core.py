"""CORE (evals/core.py) on a small bundle in nanochat's format, scored by a model whose answers are known in advance
(evals_support.py: after " bird" it predicts " saw", after anything else " the"), so the expected accuracies are
counted by hand below; nanochat's prompt templates (copied from nanochat/core_eval.py, rendered with Jinja) are the
reference for the prompts.
"""

import csv
import io
import json
import zipfile
from contextlib import redirect_stdout

import jax
import numpy as np
import pytest
import yaml

from evals_support import tokenizer, write_bigram_run
from jaxchat.cli import main
from jaxchat.config import ConfigError
from jaxchat.evals import core
from jaxchat.evals.scoring import Scorer
from jaxchat.run import Run

MC = [  # " the" wins every multiple choice it is in (the lowest mean loss)
    {"query": "Q0 pick", "choices": ["the", "dog"], "gold": 0},  # right
    {"query": "Q1 pick", "choices": ["dog", "the"], "gold": 1},  # right
    {"query": "Q2 pick", "choices": ["the", "cat"], "gold": 1},  # wrong
    {"query": "Q3 pick", "choices": ["dog", "cat", "the"], "gold": 0},  # wrong
]
SCHEMA = [  # " saw" is likely only after " bird": the "bird" context wins
    {"context_options": ["The bird", "A dog"], "continuation": "saw it", "gold": 0},  # right
    {"context_options": ["A dog", "The bird"], "continuation": "saw it", "gold": 1},  # right
    {"context_options": ["A dog", "The bird"], "continuation": "saw it", "gold": 0},  # wrong
]
LM = [  # greedy decoding writes " the" after anything but " bird"
    {"context": "Once upon ", "continuation": "the"},  # right
    {"context": "Once", "continuation": "dog"},  # wrong
    {"context": "It was  ", "continuation": "the the"},  # right
]
# by hand: accuracies 2/4, 2/3, 2/3; baselines 25, 50, 0 percent
EXPECTED = {"mc": (0.5, (0.5 - 0.25) / 0.75), "schema": (2 / 3, (2 / 3 - 0.5) / 0.5), "lm": (2 / 3, 2 / 3)}
EXPECTED_CORE = (1 / 3 + 1 / 3 + 2 / 3) / 3


def make_bundle(root, mc=MC, tasks=None, baselines=None):
    root.mkdir(parents=True, exist_ok=True)
    (root / "eval_data").mkdir(exist_ok=True)
    for name, rows in (("mc.jsonl", mc), ("schema.jsonl", SCHEMA), ("lm.jsonl", LM)):
        (root / "eval_data" / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tasks or [
        {"label": "mc", "icl_task_type": "multiple_choice", "dataset_uri": "mc.jsonl", "num_fewshot": [1],
         "continuation_delimiter": " "},
        {"label": "schema", "icl_task_type": "schema", "dataset_uri": "schema.jsonl", "num_fewshot": [0]},
        {"label": "lm", "icl_task_type": "language_modeling", "dataset_uri": "lm.jsonl", "num_fewshot": [0],
         "continuation_delimiter": " "},
    ]
    (root / "core.yaml").write_text(yaml.safe_dump({"icl_tasks": tasks}))
    with open(root / "eval_meta_data.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Eval Task", "Task Category", "Task Type", "#shots", "#datapoints", "Random baseline"])
        for label, b in (baselines or {"mc": 25.0, "schema": 50.0, "lm": 0.0}).items():
            w.writerow([label, "x", "y", 0, 3, b])
    return root


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


@pytest.fixture(scope="module")
def run_dir(tok, tmp_path_factory):
    ids = {w: tok.encode(w) for w in (" the", " bird", " saw", " dog", " cat")}
    assert all(len(v) == 1 for v in ids.values()), ids  # the hand count assumes one token per word
    table = {ids[" bird"][0]: {ids[" saw"][0]: 6.0}}
    return write_bigram_run(tmp_path_factory.mktemp("core") / "run", tok, table, {ids[" the"][0]: 6.0})


@pytest.fixture(scope="module")
def scorer(run_dir):
    run = Run.load(run_dir)
    return run, Scorer(run.fns, run.params, run.tokenizer.bos_id, batch_size=4)


def test_core_scores_match_the_hand_count(tmp_path, scorer):
    run, sc = scorer
    tasks = core.load_bundle(make_bundle(tmp_path / "bundle"))
    out = core.evaluate_core(sc, run.tokenizer, tasks, log=lambda *a: None)
    for label, (acc, cen) in EXPECTED.items():
        assert out["results"][label] == pytest.approx(acc, abs=1e-12)
        assert out["centered_results"][label] == pytest.approx(cen, abs=1e-12)
    assert 0 < EXPECTED_CORE < 1
    assert out["core_metric"] == pytest.approx(EXPECTED_CORE, abs=1e-12)
    csv_text = core.results_csv(out)
    assert csv_text.splitlines()[-1].startswith("CORE") and f"{EXPECTED_CORE:.6f}" in csv_text


def test_scores_do_not_depend_on_batching(tmp_path, scorer):
    """The per-token log-probs of a padded batch equal those of each sequence alone (float64 reference below)."""
    run, sc = scorer
    tok = run.tokenizer
    seqs = [[tok.bos_id] + tok.encode(t) for t in ("the bird saw the dog", "A", "Once upon a time the cat")]
    batched = sc.token_scores(seqs)
    forward = jax.jit(lambda p, x: run.fns.module(p)(x))
    for s, (logp, greedy) in zip(seqs, batched):
        logits = np.asarray(forward(run.params, np.asarray([s[:-1]], np.int32))[0], np.float64)
        ref = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        want = ref[np.arange(len(s) - 1), s[1:]]
        assert np.all(want < 0) and len(want) == len(s) - 1
        np.testing.assert_allclose(logp, want, atol=1e-5)
        np.testing.assert_array_equal(greedy, logits.argmax(-1))
    assert tok.decode(seqs[0][2:3]) == " bird"  # position 2 of the first: logits favour " saw", elsewhere " the"
    positions = [2] + [len(s) - 1 for s in seqs[1:]]
    at = sc.logits_at(seqs, positions)  # (what the chat evals read the answer letters from)
    for s, p, row in zip(seqs, positions, at):
        want = np.asarray(forward(run.params, np.asarray([s], np.int32))[0, p])
        assert np.abs(want).max() > 1
        np.testing.assert_allclose(row, want, atol=1e-5)


def test_core_cli_prints_the_metric_and_records_it(tmp_path, run_dir):
    bundle = make_bundle(tmp_path / "bundle")
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["eval", "--run", str(run_dir), "--core", str(bundle), "--batch-size", "3"]) == 0
    assert f"CORE metric: {EXPECTED_CORE:.4f}" in buf.getvalue()
    record = json.loads((run_dir / "evals" / "core_step000001.json").read_text())
    assert record["core"]["core_metric"] == pytest.approx(EXPECTED_CORE)


def test_prompts_equal_nanochats_jinja_templates():
    jinja2 = pytest.importorskip("jinja2", reason="jinja2 renders nanochat's own templates (the reference)")
    # the three templates, copied from nanochat/core_eval.py (commit 92d63d4)
    mc = """
{%- for example in fewshot_examples -%}
{{ example.query }}{{ continuation_delimiter }}{{ example.choices[example.gold] }}

{% endfor -%}
{{ item.query }}{{ continuation_delimiter }}{{ choice }}""".strip()
    schema = """
{%- for example in fewshot_examples -%}
{{ example.context_options[example.gold] }}{{ continuation_delimiter }}{{ example.continuation }}

{% endfor -%}
{{ context }}{{ continuation_delimiter }}{{ item.continuation }}""".strip()
    lm = """
{%- for example in fewshot_examples -%}
{{ example.context | trim }}{{ continuation_delimiter }}{{ example.continuation }}

{% endfor -%}
{{ item.context | trim }}{{ continuation_delimiter }}{% if include_continuation %}{{ item.continuation }}{% endif %}""".strip()
    lm_items = LM + [{"context": "  spaced out \n", "continuation": " tail "}]
    for delim in (" ", "\n", ": "):
        for shots in (0, 1, 2):
            ctx = {"continuation_delimiter": delim}
            for item in MC:
                few = [m for m in MC if m is not item][:shots]
                want = [jinja2.Template(mc).render(choice=c, item=item, fewshot_examples=few, **ctx)
                        for c in item["choices"]]
                assert core.render_mc(item, delim, few) == want
            for item in SCHEMA:
                few = [m for m in SCHEMA if m is not item][:shots]
                want = [jinja2.Template(schema).render(context=c, item=item, fewshot_examples=few, **ctx)
                        for c in item["context_options"]]
                assert core.render_schema(item, delim, few) == want
            for item in lm_items:
                few = [m for m in lm_items if m is not item][:shots]
                t = jinja2.Template(lm)
                want = [t.render(include_continuation=False, item=item, fewshot_examples=few, **ctx).strip(),
                        t.render(include_continuation=True, item=item, fewshot_examples=few, **ctx)]
                assert core.render_lm(item, delim, few) == want
    assert core.render_mc(MC[0], " ", [MC[1]]) == ["Q1 pick the\n\nQ0 pick the", "Q1 pick the\n\nQ0 pick dog"]


def test_fewshot_draws_and_shuffle_follow_nanochat():
    """nanochat: data shuffled by random.Random(1337); example i's shots drawn by random.Random(1234 + i)."""
    data = [{"query": f"q{i}", "choices": ["a", "b"], "gold": 0} for i in range(6)]
    task = core.CoreTask("t", "multiple_choice", 2, " ", 50.0, data)
    seqs, starts, ends = core.example_sequences(task, 3, data, lambda texts: [[ord(c) for c in t] for t in texts],
                                                bos=0, context=10_000)
    import random
    rng = random.Random(1234 + 3)
    shots = rng.sample([0, 1, 2, 4, 5], 2)
    text = "".join(chr(c) for c in seqs[0][1:])
    assert text == f"q{shots[0]} a\n\nq{shots[1]} a\n\nq3 a"
    assert starts == [len(seqs[0]) - 1] * 2 and ends == [len(s) for s in seqs]
    assert core.common_length([[1, 2, 3], [1, 2, 4]], "left") == 2
    assert core.common_length([[9, 2, 3], [1, 2, 3]], "right") == 2


def test_bad_bundles_are_refused_with_the_file_named(tmp_path):
    with pytest.raises(ConfigError, match="no CORE eval bundle.*eval_bundle.zip"):
        core.load_bundle(tmp_path / "nowhere")
    b = make_bundle(tmp_path / "b1")
    (b / "eval_data" / "mc.jsonl").write_text('{"query": "x", "choices": ["a"], "gold": 0}\n{not json\n')
    with pytest.raises(ConfigError, match=r"mc.jsonl line 2: not valid JSON"):
        core.load_bundle(b)
    b = make_bundle(tmp_path / "b2")
    (b / "core.yaml").write_text("icl_tasks: [\n")
    with pytest.raises(ConfigError, match="does not parse"):
        core.load_bundle(b)
    b = make_bundle(tmp_path / "b3", tasks=[{"label": "mc", "icl_task_type": "generation",
                                             "dataset_uri": "mc.jsonl", "num_fewshot": [0]}])
    with pytest.raises(ConfigError, match="icl_task_type 'generation'"):
        core.load_bundle(b)
    b = make_bundle(tmp_path / "b4", baselines={"mc": 25.0})
    with pytest.raises(ConfigError, match="no random baseline for task schema"):
        core.load_bundle(b)
    b = make_bundle(tmp_path / "b5", mc=[{"query": "x", "gold": 0}])
    with pytest.raises(ConfigError, match="mc.jsonl line 1: a multiple_choice example needs choices"):
        core.load_bundle(b)


def test_cli_errors_are_one_line(tmp_path, run_dir, capsys):
    assert main(["eval", "--run", str(tmp_path / "no-run"), "--core", str(make_bundle(tmp_path / "b"))]) == 2
    assert "jaxchat eval: error:" in capsys.readouterr().err
    assert main(["eval", "--run", str(run_dir), "--core", str(tmp_path / "none")]) == 2
    assert "no CORE eval bundle" in capsys.readouterr().err


def test_download_fetches_and_unzips_the_bundle(tmp_path):
    """The download code on a local file:// URL standing in for nanochat's S3 address."""
    src = make_bundle(tmp_path / "src" / "eval_bundle")
    archive = tmp_path / "eval_bundle.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in src.rglob("*"):
            z.write(p, p.relative_to(src.parent))
    dest = core.download_bundle(tmp_path / "cache" / "eval_bundle", url=archive.as_uri())
    assert [t.label for t in core.load_bundle(dest)] == ["mc", "schema", "lm"]
    with pytest.raises(ConfigError, match="already exists"):
        core.download_bundle(dest, url=archive.as_uri())
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="not a zip"):
        core.download_bundle(tmp_path / "other", url=(tmp_path / "junk.zip").as_uri())
    assert not (tmp_path / "other").exists()
    assert core.EVAL_BUNDLE_URL == "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
