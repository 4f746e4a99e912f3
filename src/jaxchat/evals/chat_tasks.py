"""nanochat's chat-eval tasks (tasks/arc.py, mmlu.py, gsm8k.py at commit 92d63d4) read from local files.

Each task is one split of a Hugging Face dataset, read from a directory DATA in one of two layouts:
    DATA/<repo>/<subset>/<split>-*.parquet | <split>*.jsonl    the dataset repository's own files, e.g. after
        `huggingface-cli download allenai/ai2_arc --repo-type dataset --local-dir DATA/allenai/ai2_arc`
    DATA/<repo with / as -->/<subset>/<split>/*.parquet          nanochat's task_data cache (load_hub_dataset)
`download_task` fills the first layout from the Hub's parquet export
(https://huggingface.co/api/datasets/<repo>/parquet/<subset>/<split>, the listing nanochat downloads from).

The rows are put in nanochat's order (its `shuffle(seed=42)`: numpy default_rng(42).permutation) and turned into
nanochat's conversations:
    ARC-Easy, ARC-Challenge, MMLU   user: render_mc(question, letters, choices); assistant: the answer letter
    GSM8K                           user: the question; assistant: the solution, its <<expr=result>> spans as
                                    calculator calls (python / python_output parts)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxchat.cache import cache_dir
from jaxchat.config import ConfigError

HF_API = "https://huggingface.co/api/datasets"


@dataclass(frozen=True)
class TaskSpec:
    repo: str
    subset: str
    split: str
    kind: str  # "categorical" (letter logits) or "generative" (sampled answers)
    baseline: float  # accuracy of random guessing (nanochat's chat_eval.py)


TASKS = {
    "ARC-Easy": TaskSpec("allenai/ai2_arc", "ARC-Easy", "test", "categorical", 0.25),
    "ARC-Challenge": TaskSpec("allenai/ai2_arc", "ARC-Challenge", "test", "categorical", 0.25),
    "MMLU": TaskSpec("cais/mmlu", "all", "test", "categorical", 0.25),
    "GSM8K": TaskSpec("openai/gsm8k", "main", "test", "generative", 0.0),
}
MMLU_LETTERS = ("A", "B", "C", "D")


def default_data_dir() -> Path:
    """<jaxchat cache>/tasks: where --data points when not given."""
    return cache_dir() / "tasks"


def task_spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ConfigError(f"unknown chat task {name!r}: choose from {', '.join(TASKS)}")
    return TASKS[name]


def task_files(name: str, data_dir: str | Path) -> list[Path]:
    """The files holding task `name` under `data_dir` (module docstring), or a ConfigError saying where it looked."""
    spec, data_dir = task_spec(name), Path(data_dir)
    own = data_dir / spec.repo / spec.subset
    files = sorted(own.glob(f"{spec.split}-*.parquet")) or sorted(own.glob(f"{spec.split}*.jsonl"))
    if not files:
        files = sorted((data_dir / spec.repo.replace("/", "--") / spec.subset / spec.split).glob("*.parquet"))
    if not files:
        raise ConfigError(f"no {name} data under {data_dir}: looked for {own}/{spec.split}-*.parquet or "
                          f"{own}/{spec.split}*.jsonl (the Hub repo's layout) and nanochat's task_data layout; "
                          f"add --download to fetch it from {HF_API}/{spec.repo}")
    return files


def download_task(name: str, data_dir: str | Path, api: str = HF_API) -> list[Path]:
    """Fetch task `name`'s split from the Hub's parquet export into DATA/<repo>/<subset>/<split>-NNNNN.parquet
    (each file written under a temporary name and renamed when complete)."""
    spec, data_dir = task_spec(name), Path(data_dir)
    listing = f"{api}/{spec.repo}/parquet/{spec.subset}/{spec.split}"
    try:
        with urllib.request.urlopen(listing) as r:
            urls = json.loads(r.read())
    except (OSError, ValueError) as e:
        raise ConfigError(f"could not list {name}'s parquet files at {listing}: {e}") from None
    out_dir = data_dir / spec.repo / spec.subset
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, url in enumerate(urls):
        path = out_dir / f"{spec.split}-{i:05d}-of-{len(urls):05d}.parquet"
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".download-")
        try:
            with urllib.request.urlopen(url) as r, os.fdopen(fd, "wb") as f:
                shutil.copyfileobj(r, f)
            os.replace(tmp, path)
        except OSError as e:
            raise ConfigError(f"could not download {url}: {e}") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        paths.append(path)
    return paths


def read_rows(files: list[Path]) -> list[tuple[str, dict]]:
    """(where, row) of every record in parquet / JSONL files, `where` naming the file and row or line."""
    rows = []
    for path in files:
        if path.suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise ConfigError(f"reading {path} needs pyarrow: pip install 'jaxchat[datasets]'") from None
            try:
                table = pq.read_table(path)
            except Exception as e:  # (pyarrow raises its own ArrowInvalid on a damaged file)
                raise ConfigError(f"{path} is not a readable parquet file: {e}") from None
            rows += [(f"{path} row {i}", r) for i, r in enumerate(table.to_pylist())]
            continue
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        rows.append((f"{path} line {n}", json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise ConfigError(f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno})") \
                            from None
    return rows


def render_mc(question: str, letters, choices) -> str:
    """nanochat's multiple-choice prompt: each choice followed by '=' and its letter (no space: the answer is the
    bare letter token)."""
    query = f"Multiple Choice question: {question}\n"
    query += "".join(f"- {choice}={letter}\n" for letter, choice in zip(letters, choices))
    return query + "\nRespond only with the letter of the correct answer."


def _arc(row: dict) -> dict:
    letters, answer = list(row["choices"]["label"]), row["answerKey"]
    if answer not in letters:
        raise ValueError(f"answerKey {answer!r} is not one of the labels {letters}")
    user = render_mc(row["question"], letters, row["choices"]["text"])
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
            "letters": letters}


def _mmlu(row: dict) -> dict:
    if len(row["choices"]) != 4 or row["answer"] not in range(4):
        raise ValueError("MMLU needs 4 choices and an answer index 0..3")
    user = render_mc(row["question"], MMLU_LETTERS, row["choices"])
    return {"messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": MMLU_LETTERS[row["answer"]]}],
            "letters": list(MMLU_LETTERS), "subject": row.get("subject")}


def _gsm8k(row: dict) -> dict:
    parts = []
    for part in re.split(r"(<<[^>]+>>)", row["answer"]):
        if part.startswith("<<") and part.endswith(">>"):
            expr, result = part[2:-2].rsplit("=", 1) if "=" in part else (part[2:-2], "")
            parts += [{"type": "python", "text": expr}, {"type": "python_output", "text": result}]
        else:
            parts.append({"type": "text", "text": part})
    return {"messages": [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": parts}]}


_CONVERT = {"ARC-Easy": _arc, "ARC-Challenge": _arc, "MMLU": _mmlu, "GSM8K": _gsm8k}


def load_task(name: str, data_dir: str | Path) -> list[dict]:
    """Task `name`'s conversations in nanochat's order; a row without the task's fields is a ConfigError naming
    its file and row."""
    rows = read_rows(task_files(name, data_dir))
    if not rows:
        raise ConfigError(f"the {name} files under {data_dir} hold no rows")
    out = []
    for i in np.random.default_rng(42).permutation(len(rows)):
        where, row = rows[int(i)]
        try:
            out.append(_CONVERT[name](row))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(f"{where}: not a {name} row ({type(e).__name__}: {e}); see the dataset card of "
                              f"{TASKS[name].repo}") from None
    return out


GSM_RE = re.compile(r"#### (\-?[0-9\.\,]+)")


def extract_answer(completion: str) -> str | None:
    """The number after '####', commas dropped (nanochat's, after the official grade-school-math code)."""
    match = GSM_RE.search(completion)
    return match.group(1).strip().replace(",", "") if match else None


def gsm8k_correct(conversation: dict, completion: str) -> bool:
    reference = extract_answer(conversation["messages"][-1]["content"][-1]["text"])
    return extract_answer(completion) == reference
