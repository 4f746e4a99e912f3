"""`jaxchat eval --core DIR` and `jaxchat eval --chat TASKS`: the flags cli.py's eval parser gets from
`add_eval_arguments`, and `run_evals`, which cli.py calls when one of them is given.

Everything a user can get wrong (a missing bundle or task file, one that does not parse, an unknown task) is
checked before the run's checkpoint is read; results are printed and recorded as JSON in RUN/evals/.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jaxchat.argtypes import count_int, finite_non_negative, positive_int
from jaxchat.chat.conversation import Specials
from jaxchat.chat.engine import Engine, Sampling
from jaxchat.config import ConfigError
from jaxchat.evals.chat_eval import categorical_accuracy, centered_mean, generative_accuracy
from jaxchat.evals.chat_tasks import TASKS, default_data_dir, download_task, load_task, task_files, task_spec
from jaxchat.evals.core import download_bundle, evaluate_core, load_bundle
from jaxchat.evals.scoring import Scorer
from jaxchat.fileio import write_json_atomic
from jaxchat.run import Run


def add_eval_arguments(e) -> None:
    g = e.add_argument_group("downstream evals (instead of validation loss)")
    g.add_argument("--core", metavar="DIR", help="nanochat's CORE metric from the unzipped eval_bundle directory "
                   "(with --download: fetched from nanochat's URL into DIR first)")
    g.add_argument("--max-per-task", type=int, default=-1, metavar="N",
                   help="--core: evaluate the first N examples of each task after nanochat's shuffle (-1 = all)")
    g.add_argument("--chat", metavar="TASKS", help="nanochat's chat evals, comma-separated: ARC-Easy, ARC-Challenge, "
                   "MMLU, GSM8K")
    g.add_argument("--data", metavar="DIR", help="--chat: where the task files are (default: <cache>/tasks; layouts in "
                   "docs/evals.md)")
    g.add_argument("--max-problems", type=positive_int, metavar="N", help="--chat: the first N problems of each task")
    g.add_argument("--num-samples", type=positive_int, default=1, help="--chat generative: completions per problem")
    g.add_argument("--max-new-tokens", type=positive_int, default=512, help="--chat generative: tokens per completion")
    g.add_argument("--temperature", type=finite_non_negative, default=0.0, help="--chat generative: 0 = greedy")
    g.add_argument("--top-k", type=count_int, default=50, help="--chat generative: keep the k most likely (0 = all)")
    g.add_argument("--download", action="store_true",
                   help="fetch what is missing: the CORE bundle into --core DIR, the chat tasks into --data")


def run_evals(args) -> bool:
    """Run the downstream evals the arguments ask for; False if they ask for none (plain validation loss)."""
    if not (args.core or args.chat):
        if args.download:
            raise ConfigError("--download fetches data for --core or --chat: pass one of them")
        return False
    if getattr(args, "run", None) is None:
        raise ConfigError("--core / --chat evaluate a run's checkpoint: pass --run RUN_DIR")
    core_tasks = chat_tasks = None
    if args.core:
        core_tasks = _core_tasks(args)
    if args.chat:
        chat_tasks = _chat_tasks(args)
    run = Run.load(args.run, args.step)
    step = int(run.state["step"])
    scorer = _scorer(run, args.batch_size)
    record = {"run": str(args.run), "step": step}
    if core_tasks is not None:
        print(f"{args.run} step {step}: CORE on {len(core_tasks)} tasks from {args.core}")
        out = evaluate_core(scorer, run.tokenizer, core_tasks, args.max_per_task)
        print(f"CORE metric: {out['core_metric']:.4f}")
        record["core"] = out
    if chat_tasks is not None:
        record["chat"] = _run_chat(args, run, scorer, chat_tasks, step)
    out_dir = Path(args.run) / "evals"
    out_dir.mkdir(exist_ok=True)
    kinds = "+".join(k for k, on in (("core", args.core), ("chat", args.chat)) if on)
    path = out_dir / f"{kinds}_step{step:06d}.json"
    write_json_atomic(path, record)
    print(f"results written to {path}")
    return True


def _scorer(run, batch_size: int):
    return Scorer(run.fns, run.params, run.tokenizer.bos_id, batch_size)


def _core_tasks(args):
    if args.max_per_task == 0 or args.max_per_task < -1:
        raise ConfigError(f"--max-per-task {args.max_per_task}: give N >= 1, or -1 for every example")
    if args.download and not (Path(args.core) / "core.yaml").is_file():
        print(f"downloading nanochat's eval bundle into {args.core}", file=sys.stderr)
        download_bundle(args.core)
    return load_bundle(args.core)


def _chat_tasks(args):
    names = [n.strip() for n in args.chat.replace("|", ",").split(",") if n.strip()]
    if not names:
        raise ConfigError(f"--chat {args.chat!r} names no task: e.g. --chat ARC-Easy,GSM8K")
    for n in names:
        task_spec(n)  # an unknown name fails before anything is read
    data = Path(args.data) if args.data else default_data_dir()
    tasks = {}
    for n in names:
        if args.download:
            try:
                task_files(n, data)
            except ConfigError:
                print(f"downloading {n} into {data}", file=sys.stderr)
                download_task(n, data)
        convs = load_task(n, data)
        tasks[n] = convs[:args.max_problems] if args.max_problems else convs
    return tasks


def _run_chat(args, run, scorer, tasks: dict, step: int) -> dict:
    Specials.of(run.tokenizer)  # a tokenizer without the chat tokens fails before anything compiles
    print(f"{args.run} step {step}: chat evals {', '.join(tasks)}")
    results = {}
    for name, convs in tasks.items():
        if TASKS[name].kind == "categorical":
            acc = categorical_accuracy(scorer, run.tokenizer, convs, name)
        else:
            engine = Engine(run.fns, run.params, run.tokenizer)
            sampling = Sampling(args.temperature, args.top_k)
            acc = generative_accuracy(engine, run.tokenizer, convs, args.num_samples, args.max_new_tokens, sampling,
                                      name=name)
        results[name] = acc
        print(f"  {name:<14} accuracy {100 * acc:6.2f}% ({round(acc * len(convs))}/{len(convs)})")
    mean = centered_mean(results)
    print(f"centered mean accuracy: {mean:.4f} (nanochat's ChatCORE when every task is run; it also counts HumanEval)")
    return {"results": results, "centered_mean": mean}
