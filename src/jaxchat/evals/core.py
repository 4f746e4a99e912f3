"""CORE, nanochat's base-model metric (the DCLM paper's 22 in-context-learning tasks), scored exactly as nanochat
scores it (nanochat/core_eval.py and scripts/base_eval.py, commit 92d63d4).

The eval bundle is a directory (nanochat's eval_bundle.zip, unzipped):
    core.yaml               icl_tasks: [{label, icl_task_type, dataset_uri, num_fewshot: [k], continuation_delimiter}]
    eval_meta_data.csv      columns 'Eval Task' (= label) and 'Random baseline' (percent)
    eval_data/<dataset_uri> JSONL, one example per line

Per task: the examples are shuffled with random.Random(1337) (then cut to --max-per-task); example i gets
`num_fewshot` others drawn with random.Random(1234 + i) from that same list; the prompts are rendered as below,
each encoded with BOS in front, and scored by one forward:
    multiple_choice     query + delimiter + choice, one prompt per choice (common prefix = the context);
                        correct if the choice with the lowest mean loss over its own tokens is `gold`
    schema              context_option + delimiter + continuation, one per context option (common suffix =
                        the continuation); correct as above
    language_modeling   context.strip() + delimiter + continuation; correct if greedy decoding reproduces every
                        continuation token
(few-shot examples come first, each in the same form with its gold answer, followed by a blank line).
A task's accuracy is centered on its random baseline b (percent): (acc - b/100) / (1 - b/100); CORE is the mean
centered accuracy over the tasks.

nanochat forwards prompts of any length (its GPT has no `max_seq_len`); jaxchat's model has a fixed context, so
a longer prompt keeps its last `context` tokens, which is what nanochat's own code does for models that have one.
"""

from __future__ import annotations

import csv
import json
import random
import shutil
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from jaxchat.cache import cache_dir
from jaxchat.config import ConfigError

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"  # nanochat's base_eval.py
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")


def default_bundle_dir() -> Path:
    """Where `--download` puts the bundle when no directory is given: <jaxchat cache>/eval_bundle."""
    return cache_dir() / "eval_bundle"


def download_bundle(dest: str | Path, url: str = EVAL_BUNDLE_URL) -> Path:
    """Download nanochat's eval_bundle.zip from `url` and unzip its `eval_bundle/` folder to `dest`, which must
    not exist yet (the folder appears whole, by one rename, or not at all)."""
    dest = Path(dest)
    if dest.exists():
        raise ConfigError(f"{dest} already exists: pass it without --download to use it, or another directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".eval_bundle-") as tmp:
        archive = Path(tmp) / "eval_bundle.zip"
        try:
            with urllib.request.urlopen(url) as r, open(archive, "wb") as f:
                shutil.copyfileobj(r, f)
        except OSError as e:
            raise ConfigError(f"could not download the CORE eval bundle from {url}: {e}") from None
        try:
            with zipfile.ZipFile(archive) as z:
                z.extractall(tmp)
        except zipfile.BadZipFile:
            raise ConfigError(f"{url} is not a zip archive") from None
        if not (Path(tmp) / "eval_bundle" / "core.yaml").is_file():
            raise ConfigError(f"{url} holds no eval_bundle/core.yaml: not nanochat's eval bundle")
        (Path(tmp) / "eval_bundle").rename(dest)
    return dest


@dataclass
class CoreTask:
    label: str
    task_type: str
    num_fewshot: int
    delimiter: str
    baseline: float  # percent
    data: list[dict]


def load_bundle(path: str | Path) -> list[CoreTask]:
    """The tasks of an eval bundle directory, every file checked (ConfigError naming the file and the fix)."""
    path = Path(path)
    config = path / "core.yaml"
    if not config.is_file():
        raise ConfigError(f"no CORE eval bundle at {path} (no core.yaml): pass the unzipped eval_bundle directory "
                          f"of nanochat ({EVAL_BUNDLE_URL}), or add --download to fetch it there")
    try:
        tasks = yaml.safe_load(config.read_text(encoding="utf-8"))["icl_tasks"]
    except (yaml.YAMLError, TypeError, KeyError) as e:
        raise ConfigError(f"{config} does not parse as nanochat's core.yaml (a mapping with 'icl_tasks'): {e}") \
            from None
    baselines = _baselines(path / "eval_meta_data.csv")
    out = []
    for j, t in enumerate(tasks):
        try:
            label, task_type, uri = t["label"], t["icl_task_type"], t["dataset_uri"]
            shots = t["num_fewshot"][0]
        except (TypeError, KeyError, IndexError) as e:
            raise ConfigError(f"{config}: icl_tasks[{j}] lacks {e} (needs label, icl_task_type, dataset_uri, "
                              f"num_fewshot: [k])") from None
        if task_type not in TASK_TYPES:
            raise ConfigError(f"{config}: task {label} has icl_task_type {task_type!r}; CORE knows "
                              f"{', '.join(TASK_TYPES)}")
        if label not in baselines:
            raise ConfigError(f"{path / 'eval_meta_data.csv'} has no random baseline for task {label}")
        out.append(CoreTask(label, task_type, int(shots), t.get("continuation_delimiter", " "), baselines[label],
                            _examples(path / "eval_data" / uri, task_type)))
    if not out:
        raise ConfigError(f"{config} lists no icl_tasks")
    return out


def _baselines(path: Path) -> dict[str, float]:
    if not path.is_file():
        raise ConfigError(f"no {path}: the bundle needs its eval_meta_data.csv (the random baselines)")
    with open(path, encoding="utf-8", newline="") as f:
        try:
            return {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
        except (KeyError, ValueError, TypeError) as e:
            raise ConfigError(f"{path}: needs columns 'Eval Task' and 'Random baseline' (a number): {e}") from None


_FIELDS = {"multiple_choice": ("query", "choices", "gold"), "schema": ("context_options", "continuation", "gold"),
           "language_modeling": ("context", "continuation")}


def _examples(path: Path, task_type: str) -> list[dict]:
    if not path.is_file():
        raise ConfigError(f"no {path}: the bundle's eval_data is incomplete (unzip the whole eval_bundle.zip)")
    data = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
            missing = [k for k in _FIELDS[task_type] if not isinstance(item, dict) or k not in item]
            if missing:
                raise ConfigError(f"{path} line {n}: a {task_type} example needs {', '.join(missing)}")
            data.append(item)
    if not data:
        raise ConfigError(f"{path} holds no examples")
    return data


# ------------------------------------------------------------------------------------------------------------
# prompts (nanochat renders these with Jinja templates; the strings below are what those templates produce)

def render_mc(item, delim: str, fewshot: list[dict]) -> list[str]:
    head = "".join(f"{e['query']}{delim}{e['choices'][e['gold']]}\n\n" for e in fewshot)
    return [f"{head}{item['query']}{delim}{c}" for c in item["choices"]]


def render_schema(item, delim: str, fewshot: list[dict]) -> list[str]:
    head = "".join(f"{e['context_options'][e['gold']]}{delim}{e['continuation']}\n\n" for e in fewshot)
    return [f"{head}{c}{delim}{item['continuation']}" for c in item["context_options"]]


def render_lm(item, delim: str, fewshot: list[dict]) -> list[str]:
    """[prompt without the continuation (stripped), prompt with it] (nanochat's Jinja `trim` is str.strip)."""
    head = "".join(f"{e['context'].strip()}{delim}{e['continuation']}\n\n" for e in fewshot)
    without = f"{head}{item['context'].strip()}{delim}"
    return [without.strip(), f"{without}{item['continuation']}"]


def common_length(seqs: list[list[int]], direction: str) -> int:
    """Length of the prefix ('left') or suffix ('right') all sequences share."""
    n = min(len(s) for s in seqs)
    for i in range(n):
        j = i if direction == "left" else -1 - i
        if any(s[j] != seqs[0][j] for s in seqs):
            return i
    return n


def example_sequences(task: CoreTask, idx: int, data: list[dict], encode, bos: int, context: int):
    """(token sequences, start, end per sequence) of example `idx`: the tokens in [start, end) are scored."""
    item, fewshot = data[idx], []
    if task.num_fewshot > 0:
        if task.num_fewshot >= len(data):
            raise ConfigError(f"task {task.label} draws {task.num_fewshot} few-shot examples from only {len(data)} "
                              f"examples: raise --max-per-task (or give the task more examples)")
        rng = random.Random(1234 + idx)
        fewshot = [data[i] for i in rng.sample([i for i in range(len(data)) if i != idx], task.num_fewshot)]
    render = {"multiple_choice": render_mc, "schema": render_schema, "language_modeling": render_lm}[task.task_type]
    seqs = [[bos] + ids for ids in encode(render(item, task.delimiter, fewshot))]
    if task.task_type == "multiple_choice":
        start = common_length(seqs, "left")
        starts, ends = [start] * len(seqs), [len(s) for s in seqs]
    elif task.task_type == "schema":
        suffix = common_length(seqs, "right")
        ends = [len(s) for s in seqs]
        starts = [e - suffix for e in ends]
    else:
        without, with_ = seqs
        if not (len(without) < len(with_) and with_[:len(without)] == without):
            raise ConfigError(f"task {task.label} example {idx}: the prompt without the continuation does not "
                              f"tokenize to a prefix of the prompt with it")
        seqs, starts, ends = [with_], [len(without)], [len(with_)]
    cropped = [max(len(s) - context, 0) for s in seqs]  # keep the last `context` tokens (module docstring)
    if any(s - c < 1 for s, c in zip(starts, cropped)):
        raise ConfigError(f"task {task.label} example {idx}: its answer alone is longer than the model's context "
                          f"of {context} tokens")
    return ([s[c:] for s, c in zip(seqs, cropped)], [s - c for s, c in zip(starts, cropped)],
            [e - c for e, c in zip(ends, cropped)])


def task_accuracy(task: CoreTask, scorer, tok, max_per_task: int = -1) -> float:
    """Fraction of the task's examples answered correctly, all examples' sequences scored in batches."""
    data = list(task.data)
    random.Random(1337).shuffle(data)
    if max_per_task > 0:
        data = data[:max_per_task]
    examples = [example_sequences(task, i, data, tok.encode_batch, tok.bos_id, scorer.context)
                for i in range(len(data))]
    flat = [s for seqs, _, _ in examples for s in seqs]
    scores = iter(scorer.token_scores(flat))
    correct = 0
    for i, (seqs, starts, ends) in enumerate(examples):
        scored = [next(scores) for _ in seqs]
        if task.task_type == "language_modeling":
            (_, greedy), s, e = scored[0], starts[0], ends[0]
            correct += bool(np.array_equal(greedy[s - 1:e - 1], np.asarray(seqs[0][s:e])))
        else:
            mean_loss = [-logp[s - 1:e - 1].mean() for (logp, _), s, e in zip(scored, starts, ends)]
            correct += int(np.argmin(mean_loss)) == data[i]["gold"]
    return correct / len(data)


def centered(accuracy: float, baseline: float) -> float:
    return (accuracy - 0.01 * baseline) / (1.0 - 0.01 * baseline)


def evaluate_core(scorer, tok, tasks: list[CoreTask], max_per_task: int = -1, log=print) -> dict:
    """{'results': accuracy per task, 'centered_results': centered accuracy per task, 'core_metric': their mean}."""
    results, centered_results = {}, {}
    for task in tasks:
        acc = task_accuracy(task, scorer, tok, max_per_task)
        results[task.label], centered_results[task.label] = acc, centered(acc, task.baseline)
        log(f"  {task.label:<32} {task.num_fewshot}-shot {task.task_type:<17} accuracy {acc:.4f} | "
            f"centered {centered_results[task.label]:.4f}")
    core = sum(centered_results.values()) / len(centered_results)
    return {"results": results, "centered_results": centered_results, "core_metric": core}


def results_csv(out: dict) -> str:
    """The results in nanochat's base_eval CSV layout."""
    lines = [f"{'Task':<35}, {'Accuracy':<10}, {'Centered':<10}"]
    for label, acc in out["results"].items():
        lines.append(f"{label:<35}, {acc:<10.6f}, {out['centered_results'][label]:<10.6f}")
    lines.append(f"{'CORE':<35}, {'':<10}, {out['core_metric']:<10.6f}")
    return "\n".join(lines) + "\n"
