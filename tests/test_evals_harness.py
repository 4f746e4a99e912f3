"""The lm-evaluation-harness model (evals/harness.py) on a model whose log-probabilities are known in closed form
(evals_support.py): after " bird" it puts logit 6 on " saw", after anything else logit 6 on " the", every other
logit 0. So log p(" the") = 6 - log(e^6 + V - 1) and log p(any other token) = -log(e^6 + V - 1), and every
expected value below is computed from those two numbers and token counts.

lm_eval is not in the fast suite's `test` extra (it pulls datasets, evaluate, scikit-learn, ...): install
'jaxchat[lmeval]' to run this file.
"""

import json
import math
import os
import subprocess
import sys
from importlib import metadata

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed: pip install "
                                                "'jaxchat[lmeval]' (the fast suite does not install it)")

from lm_eval.api.instance import Instance  # noqa: E402

from evals_support import VOCAB, tokenizer, write_bigram_run  # noqa: E402

LOGZ = math.log(math.exp(6.0) + VOCAB - 1)
LP_THE, LP_OTHER = 6.0 - LOGZ, -LOGZ
MC = [{"query": "Q0 pick", "choices": ["the", "dog"], "gold": 0},  # right: " the" is the likeliest choice
      {"query": "Q1 pick", "choices": ["dog", "the"], "gold": 1},  # right
      {"query": "Q2 pick", "choices": ["the", "cat"], "gold": 1},  # wrong
      {"query": "Q3 pick", "choices": ["dog", "cat", "the"], "gold": 0}]  # wrong: acc 2/4 by hand
TASK_YAML = """task: jaxchat_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: query
doc_to_choice: choices
doc_to_target: gold
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tok = tokenizer()
    ids = {w: tok.encode(w) for w in (" the", " bird", " saw", " dog", " cat")}
    assert all(len(v) == 1 for v in ids.values()), ids
    return write_bigram_run(tmp_path_factory.mktemp("lmeval") / "run", tok, {ids[" bird"][0]: {ids[" saw"][0]: 6.0}},
                            {ids[" the"][0]: 6.0})


@pytest.fixture(scope="module")
def lm(run_dir):
    from jaxchat.evals.harness import JaxchatLM
    return JaxchatLM(run=str(run_dir), batch_size="3")


def req(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_registered_under_jaxchat_and_declared_as_entry_point(lm):
    from lm_eval.api.registry import get_model
    from jaxchat.evals.harness import JaxchatLM
    assert get_model("jaxchat") is JaxchatLM
    eps = [ep for ep in metadata.entry_points(group="lm_eval.models") if ep.name == "jaxchat"]
    assert [ep.value for ep in eps] == ["jaxchat.evals.harness:JaxchatLM"]


def test_loglikelihood_equals_the_closed_form(lm):
    out = lm.loglikelihood([req("loglikelihood", "Q pick", " the"), req("loglikelihood", "Q pick", " dog"),
                            req("loglikelihood", "Q pick", " the the"), req("loglikelihood", "", " the"),
                            req("loglikelihood", "The bird", " saw the")])
    want = [(LP_THE, True), (LP_OTHER, False), (2 * LP_THE, True), (LP_THE, True), (2 * LP_THE, True)]
    assert LP_THE < 0 and LP_OTHER < LP_THE
    for (ll, greedy), (w, g) in zip(out, want):
        assert ll == pytest.approx(w, abs=1e-4) and greedy is g


def test_loglikelihood_rolling_covers_every_token_once(lm):
    """A text longer than the context (128) is scored in several windows; each token counts once."""
    text = " the dog" * 90 + " cat"
    tokens = lm.tok.encode(text)
    assert len(tokens) > 128
    n_the = sum(t == lm.tok.encode(" the")[0] for t in tokens)
    assert n_the == 90
    want = n_the * LP_THE + (len(tokens) - n_the) * LP_OTHER
    (got,) = lm.loglikelihood_rolling([req("loglikelihood_rolling", text)])
    assert got == pytest.approx(want, rel=1e-5)


def test_generate_until_decodes_greedily_and_stops(lm):
    out = lm.generate_until([req("generate_until", "Once", {"until": ["\n"], "max_gen_toks": 3}),
                             req("generate_until", "The bird", {"until": ["\n"], "max_gen_toks": 3}),
                             req("generate_until", "Once", {"until": [" the the"], "max_gen_toks": 40}),
                             req("generate_until", "Once", {"until": "the", "max_gen_toks": 5, "do_sample": False})])
    assert out == [" the the the", " saw the the", "", " "]


def test_simple_evaluate_on_a_local_yaml_task(lm, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in MC))
    (tmp_path / "task.yaml").write_text(TASK_YAML.format(data=data))
    res = simple_evaluate(model=lm, tasks=["jaxchat_local_mc"], task_manager=TaskManager(include_path=str(tmp_path)))
    assert res["results"]["jaxchat_local_mc"]["acc,none"] == pytest.approx(0.5)


@pytest.mark.slow  # (a fresh process: imports lm_eval and JAX, compiles)
def test_command_line(run_dir, tmp_path):
    """`jaxchat-lm-eval` = lm_eval's own CLI with the model registered (lm_eval 0.4.13 reads no entry points)."""
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in MC))
    (tmp_path / "task.yaml").write_text(TASK_YAML.format(data=data))
    out = tmp_path / "out"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "jaxchat.evals.lmeval_cli", "--model", "jaxchat", "--model_args",
                        f"run={run_dir}", "--batch_size", "2", "--tasks", "jaxchat_local_mc", "--include_path",
                        str(tmp_path), "--output_path", str(out)], capture_output=True, text=True, env=env,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "jaxchat_local_mc" in p.stdout and "0.5" in p.stdout, p.stdout
    p = subprocess.run([sys.executable, "-m", "jaxchat.evals.lmeval_cli", "--model", "jaxchat", "--model_args",
                        f"run={tmp_path / 'nope'}", "--tasks", "jaxchat_local_mc", "--include_path", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode != 0 and "nope" in p.stderr
