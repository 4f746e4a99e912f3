"""Mutation testing for jaxchat's core modules, on demand (`make mutate`), never in CI (pytest does not collect it).

Why our own runner and not mutmut or cosmic-ray: both run the selected tests once per mutant in a fresh process,
and so do we, but neither lets us (a) pick a tight pytest selection per *module* with `-k` filters, which is what
keeps JAX's compile time (seconds per test, every mutant recompiles) affordable, (b) sample mutants per module with
a seed to fit a time budget, and (c) leave the working tree alone: mutmut 3 rewrites the sources into `mutants/`
with a trampoline around every function (which changes what `jax.jit` traces and caches) and cosmic-ray mutates the
tree in place. Here each mutant is one source edit in a private copy of the repository (src/ and tests/), run with
`PYTHONPATH=<copy>/src` (ahead of the editable install), so an interrupted run never leaves a mutated file behind.

Operators (Python `ast`, applied as a text edit of the node's own span so the rest of the file is untouched):
  binop      + <-> -, * <-> /, // -> /, ** -> *, % -> *
  compare    < <-> <=, > <-> >=, == <-> !=, is <-> is not, in <-> not in
  boolop     and <-> or
  not        `not x` -> `x`;  unary minus `-x` -> `x`
  const      int n -> n + 1 (0 -> 1, 1 -> 2, ...), float x -> 1.5 x (0.0 -> 1.0), True <-> False
  slice      a[i:j] -> a[i + 1:j] / a[i:j + 1] / a[i:j - 1]  (off by one at each present bound)
  range      range(a, b) -> range(a, b + 1); range(n) -> range(n - 1)
  stmt       an assignment, augmented assignment or expression statement -> `pass`
Never mutated: docstrings and other strings, f-strings, `raise` and `assert` statements (error messages and
guards are tested by tests/test_errors.py, not here), annotations, decorators, imports, `__all__`.

Each mutant runs only its module's tests (MODULE_TESTS below, a tight selection) with `-x`, a per-mutant timeout
and `-p no:cacheprovider`; a test failure, an error or a timeout kills it. Results are appended to
<out>/results.jsonl as they come (a run stopped half-way keeps them; `--resume` skips those done), then
<out>/report.md lists the score and every survivor. Mutants named in docs/mutation.md's "Equivalent mutants" table
count neither way.

  python scripts/mutate.py --list                         # how many mutants per module
  python scripts/mutate.py --modules optim/schedules.py --sample 20 --seed 0
  python scripts/mutate.py --sample 15 --jobs 2 --timeout 300 --out .mutation
  python scripts/mutate.py --only 'src/jaxchat/evaluate.py:31:...'   # one mutant by id (see the report)
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EQUIVALENT_DOC = ROOT / "docs" / "mutation.md"

# module (relative to src/jaxchat) -> the pytest arguments that cover it. Kept tight: every mutant pays these.
MODULE_TESTS: dict[str, list[str]] = {
    "model/gpt.py": ["tests/test_parity.py", "tests/test_model.py", "tests/test_golf_model.py",
                     "tests/test_speedrun_model.py", "-k",
                     "nanochat_logits or nanochat_loss or greedy_logits or golf_pr334 or kv_cache or causality "
                     "or smear or window or parameter_counts or decode or switch or xsa or backout"],
    "model/attention.py": ["tests/test_attention.py", "-k", "not slow and not profile"],
    "model/rotary.py": ["tests/test_rotary.py", "tests/test_speedrun_model.py", "-k", "not marin_presets"],
    "model/mlp.py": ["tests/test_parity.py", "tests/test_model.py", "-k",
                     "nanochat_logits or yatnmn or golf_pr334 or gelu or swiglu"],
    "model/init.py": ["tests/test_init_tables.py", "tests/test_golf_model.py", "tests/test_speedrun_model.py", "-k",
                      "init or table or row or ortho or bigram"],
    "model/head.py": ["tests/test_head.py"],
    "model/embeddings.py": ["tests/test_golf_model.py", "tests/test_parity.py", "-k", "not every"],
    "model/scan.py": ["tests/test_scan.py"],
    "model/remat.py": ["tests/test_scan.py"],
    "model/accounting.py": ["tests/test_model.py", "tests/test_golf_model.py", "tests/test_optim_recipe.py",
                            "tests/test_speedrun_model.py", "-k",
                            "flops or param or count or accounting or plan or mfu or levanter or marin"],
    "optim/muon.py": ["tests/test_muon.py"],
    "optim/adamw.py": ["tests/test_adamw.py"],
    "optim/groups.py": ["tests/test_optim_recipe.py"],
    "optim/schedules.py": ["tests/test_schedules.py", "tests/test_optim_recipe.py::test_schedules_at_chosen_steps"],
    "optim/scaling.py": ["tests/test_optim_recipe.py", "-k", "not trained and not step"],
    "data/packing.py": ["tests/test_data.py", "-k", "bestfit or split_long"],
    "evaluate.py": ["tests/test_evaluate.py", "tests/test_sentencepiece.py"],
    "train.py": ["tests/test_train.py"],
    "checkpoint.py": ["tests/test_train.py", "tests/test_resume.py", "tests/test_reliability.py", "-k",
                      "checkpoint_round_trip or retention or async or damaged or temporaries"],
    "resume.py": ["tests/test_scan.py", "tests/test_resume.py", "tests/test_reliability.py", "-k",
                  "execution_options or compute_dtype_auto or sigkill or reconcile or no_sequence or garbage_tokenizer "
                  "or no_checkpoint or restart_accounting"],
}
CORE = list(MODULE_TESTS)

BINOPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
          ast.Pow: ast.Mult, ast.Mod: ast.Mult}
CMPOPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
          ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}


@dataclass
class Mutant:
    id: str          # path:line:col:operator, stable while the file's text before it is unchanged
    path: str        # relative to the repository root
    line: int
    col: int
    end_line: int
    end_col: int
    op: str
    original: str    # the source line, for the report
    replacement: str  # text that replaces the node's span


def _skipped_nodes(tree) -> set[int]:
    """ids of nodes never mutated: everything inside raise/assert/imports/annotations/decorators/f-strings and
    docstrings."""
    skip = set()

    def mark(n):
        for sub in ast.walk(n):
            skip.add(id(sub))

    for n in ast.walk(tree):
        if isinstance(n, (ast.Raise, ast.Assert, ast.Import, ast.ImportFrom, ast.JoinedStr, ast.Global,
                          ast.Nonlocal)):
            mark(n)
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for d in n.decorator_list:
                mark(d)
            if not isinstance(n, ast.ClassDef):
                for a in n.args.args + n.args.kwonlyargs + n.args.posonlyargs:
                    if a.annotation is not None:
                        mark(a.annotation)
                if n.returns is not None:
                    mark(n.returns)
        if isinstance(n, ast.AnnAssign):
            mark(n.annotation)
        if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.body:
            first = n.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                mark(first)
        if isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets):
            mark(n)
        if isinstance(n, ast.If) and isinstance(n.test, ast.Compare) and \
                isinstance(n.test.left, ast.Name) and n.test.left.id == "__name__":
            mark(n)
    return skip


def _expr_mutations(node) -> list[tuple[str, ast.AST]]:
    """(operator name, replacement node) for one expression node."""
    out = []
    if isinstance(node, ast.BinOp) and type(node.op) in BINOPS:
        new = BINOPS[type(node.op)]
        out.append((f"{type(node.op).__name__}->{new.__name__}", ast.BinOp(node.left, new(), node.right)))
    elif isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            if type(op) in CMPOPS:
                ops = list(node.ops)
                ops[i] = CMPOPS[type(op)]()
                out.append((f"{type(op).__name__}->{type(ops[i]).__name__}",
                            ast.Compare(node.left, ops, node.comparators)))
    elif isinstance(node, ast.BoolOp):
        new = ast.Or if isinstance(node.op, ast.And) else ast.And
        out.append((f"{type(node.op).__name__}->{new.__name__}", ast.BoolOp(new(), node.values)))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
        out.append((f"drop-{type(node.op).__name__}", node.operand))
    elif isinstance(node, ast.Constant) and type(node.value) in (bool, int, float):
        v = node.value
        if isinstance(v, bool):
            out.append((f"{v}->{not v}", ast.Constant(not v)))
        elif isinstance(v, int):
            out.append((f"{v}->{v + 1}", ast.Constant(v + 1)))
        else:
            out.append((f"{v!r}->{(v * 1.5 if v else 1.0)!r}", ast.Constant(v * 1.5 if v else 1.0)))
    elif isinstance(node, ast.Slice):
        one = ast.Constant(1)
        if node.lower is not None:
            out.append(("slice-lower+1", ast.Slice(ast.BinOp(node.lower, ast.Add(), one), node.upper, node.step)))
        if node.upper is not None:
            out.append(("slice-upper+1", ast.Slice(node.lower, ast.BinOp(node.upper, ast.Add(), one), node.step)))
            out.append(("slice-upper-1", ast.Slice(node.lower, ast.BinOp(node.upper, ast.Sub(), one), node.step)))
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "range" \
            and 1 <= len(node.args) <= 2 and not node.keywords:
        args = list(node.args)
        if len(args) == 1:
            args[0] = ast.BinOp(args[0], ast.Sub(), ast.Constant(1))
            out.append(("range-stop-1", ast.Call(node.func, args, [])))
        else:
            args[1] = ast.BinOp(args[1], ast.Add(), ast.Constant(1))
            out.append(("range-stop+1", ast.Call(node.func, args, [])))
    return out


def mutants_of(path: Path) -> list[Mutant]:
    src = path.read_text()
    lines = src.split("\n")
    tree = ast.parse(src)
    skip = _skipped_nodes(tree)
    rel = str(path.relative_to(ROOT))
    out = []
    for node in ast.walk(tree):
        if id(node) in skip or not hasattr(node, "lineno"):
            continue
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.Expr)) or \
                isinstance(node, ast.AnnAssign) and node.value is not None:
            edits = [("stmt->pass", None)]
        elif isinstance(node, ast.expr) or isinstance(node, ast.Slice):
            edits = _expr_mutations(node)  # a negative literal is UnaryOp(USub, Constant): both get mutants
        else:
            continue
        for op, new in edits:
            repl = "pass" if new is None else (ast.unparse(new) if isinstance(node, ast.Slice)
                                               else f"({ast.unparse(new)})")
            out.append(Mutant(id=f"{rel}:{node.lineno}:{node.col_offset}:{op}", path=rel, line=node.lineno,
                              col=node.col_offset, end_line=node.end_lineno, end_col=node.end_col_offset, op=op,
                              original=lines[node.lineno - 1].strip(), replacement=repl))
    valid = []  # keep only edits that still parse
    for m in out:
        try:
            ast.parse(apply(src, m))
        except SyntaxError:
            continue
        valid.append(m)
    return sorted(valid, key=lambda m: (m.line, m.col, m.op))


def apply(src: str, m: Mutant) -> str:
    """src with the mutant's span replaced; ast's column offsets count UTF-8 bytes, so the edit is made on bytes."""
    lines = src.encode().split(b"\n")
    start = sum(len(x) + 1 for x in lines[:m.line - 1]) + m.col
    end = sum(len(x) + 1 for x in lines[:m.end_line - 1]) + m.end_col
    data = src.encode()
    return (data[:start] + m.replacement.encode() + data[end:]).decode()


def equivalent_ids() -> dict[str, str]:
    """id -> reason, from the `| `id` | reason |` rows under docs/mutation.md's "Equivalent mutants" heading."""
    if not EQUIVALENT_DOC.exists():
        return {}
    out, inside = {}, False
    for line in EQUIVALENT_DOC.read_text().splitlines():
        if line.startswith("## "):
            inside = line.strip().lower().startswith("## equivalent mutants")
        m = re.match(r"^\|\s*`([^`]+)`\s*\|\s*(.*?)\s*\|\s*$", line)
        if inside and m:
            out[m.group(1)] = m.group(2)
    return out


def make_copy(dest: Path) -> Path:
    """A private copy of what the tests need: src/, tests/, pyproject.toml."""
    for name in ("src", "tests"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


RUNNING: set[subprocess.Popen] = set()
STOPPING = threading.Event()  # set on SIGTERM: a pytest killed by the stop is not a kill of its mutant


def _kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _stop(signum, frame):
    STOPPING.set()
    for p in list(RUNNING):
        _kill_group(p)
    raise SystemExit(f"stopped by signal {signum}; results so far are in results.jsonl (--resume continues)")


def run_tests(copy: Path, module: str, timeout: float, cache: Path) -> tuple[str, float, str]:
    """'passed' | 'failed' | 'timeout', seconds, the last lines of output (the copy holds the mutant)."""
    env = dict(os.environ, PYTHONPATH=str(copy / "src"), PYTHONDONTWRITEBYTECODE="1", JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(cache))
    env.pop("JAXCHAT_CACHE", None)  # each test session gets its own private dataset cache (tests/conftest.py)
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *MODULE_TESTS[module]]
    t0 = time.time()
    # its own process group, so a timeout (or stopping the runner) ends pytest and every child it started
    p = subprocess.Popen(cmd, cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    RUNNING.add(p)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(p)
        p.communicate()
        return "timeout", time.time() - t0, ""
    finally:
        RUNNING.discard(p)
    tail = "\n".join(out.strip().splitlines()[-3:])
    if p.returncode == 5:  # pytest collected nothing: the selection is wrong, which must not count as a kill
        raise SystemExit(f"pytest collected no tests for {module} ({MODULE_TESTS[module]}): fix MODULE_TESTS")
    return ("passed" if p.returncode == 0 else "failed"), time.time() - t0, tail


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modules", nargs="*", default=CORE, help="modules under src/jaxchat (default: all core ones)")
    ap.add_argument("--sample", type=int, default=0, help="at most this many mutants per module (0: all)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the per-module sample")
    ap.add_argument("--jobs", type=int, default=1, help="mutants run at once (each in its own copy)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per mutant; a mutant over it is killed")
    ap.add_argument("--out", type=Path, default=ROOT / ".mutation", help="results.jsonl and report.md go here")
    ap.add_argument("--resume", action="store_true", help="skip mutants already in <out>/results.jsonl")
    ap.add_argument("--only", nargs="*", help="run exactly these mutant ids")
    ap.add_argument("--list", action="store_true", help="print the mutant counts (and ids with -v), run nothing")
    ap.add_argument("--no-baseline", action="store_true", help="skip checking each module's tests pass unmutated")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite <out>/report.md from results.jsonl, run nothing")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)

    unknown = [m for m in args.modules if m not in MODULE_TESTS]
    if unknown:
        ap.error(f"no test selection for {unknown}: one of {CORE}")
    per_module = {m: mutants_of(ROOT / "src" / "jaxchat" / m) for m in args.modules}
    if args.only:
        wanted = set(args.only)
        chosen = [x for ms in per_module.values() for x in ms if x.id in wanted]
        missing = wanted - {x.id for x in chosen}
        if missing:
            ap.error(f"no such mutant (the file changed since?): {sorted(missing)}")
    else:
        chosen = []
        for m, ms in per_module.items():
            pick = ms if not args.sample or len(ms) <= args.sample else \
                sorted(random.Random(f"{args.seed}:{m}").sample(ms, args.sample), key=lambda x: (x.line, x.col))
            chosen += pick
    if args.list:
        for m, ms in per_module.items():
            print(f"{m:24s} {len(ms):5d} mutants")
            if args.verbose:
                for x in ms:
                    print(f"   {x.id}    {x.original}  =>  {x.replacement}")
        print(f"total {sum(len(ms) for ms in per_module.values())}; this selection runs {len(chosen)}")
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.jsonl"
    if args.report_only:
        return report_from(args, results_path)
    done = {}
    if args.resume and results_path.exists():
        done = {r["id"]: r for r in map(json.loads, results_path.read_text().splitlines())}
    elif results_path.exists():
        results_path.unlink()
    todo = chosen if args.only else [x for x in chosen if x.id not in done]  # --only reruns what it names
    cache = args.out / "xla-cache"  # compiled programs shared across mutants (keys are the programs' HLO)
    work = Path(tempfile.mkdtemp(prefix="jaxchat-mutate-"))
    module_of = {x.id: m for m, ms in per_module.items() for x in ms}
    print(f"{len(chosen)} mutants chosen ({len(done)} already done), {args.jobs} job(s), timeout {args.timeout}s",
          flush=True)
    try:
        copies = [make_copy(work / f"copy{j}") for j in range(max(1, args.jobs))]
        if not args.no_baseline:
            for m in sorted({module_of[x.id] for x in todo}):
                status, secs, tail = run_tests(copies[0], m, max(args.timeout, 900), cache)
                print(f"baseline {m}: {status} in {secs:.0f}s", flush=True)
                if status != "passed":
                    print(tail)
                    print(f"the tests of {m} fail unmutated: fix them first", file=sys.stderr)
                    return 2
        free = list(copies)

        def one(x: Mutant) -> dict:
            copy = free.pop()
            target = copy / x.path
            original = target.read_text()
            try:
                target.write_text(apply(original, x))
                status, secs, tail = run_tests(copy, module_of[x.id], args.timeout, cache)
            finally:
                target.write_text(original)
                free.append(copy)
            if STOPPING.is_set():
                return {}
            rec = {**asdict(x), "module": module_of[x.id], "status": status, "seconds": round(secs, 1),
                   "tail": tail}
            with results_path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            mark = "SURVIVED" if status == "passed" else status
            print(f"[{mark:8s}] {secs:5.0f}s {x.id}   {x.original[:70]}  =>  {x.replacement[:50]}", flush=True)
            return rec

        pool = ThreadPoolExecutor(max(1, args.jobs))
        try:
            list(pool.map(one, todo))
        finally:
            pool.shutdown(wait=not STOPPING.is_set(), cancel_futures=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    return report_from(args, results_path)


def report_from(args, results_path: Path) -> int:
    """The report covers every result in <out> (several invocations with --resume add up), counted per module."""
    results = list({r["id"]: r for r in map(json.loads, results_path.read_text().splitlines())}.values())
    all_modules = {m: mutants_of(ROOT / "src" / "jaxchat" / m) for m in CORE}
    write_report(args, results, all_modules)
    return 0


def write_report(args, results: list[dict], per_module: dict) -> None:
    eq = equivalent_ids()
    lines = ["# Mutation report", "",
             f"last command: `python scripts/mutate.py {' '.join(sys.argv[1:])}` (results of earlier --resume runs "
             "into the same --out included)",
             f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             "| module | mutants in module | run | killed | survived | timed out | equivalent | score |",
             "|---|---|---|---|---|---|---|---|"]
    tot = [0, 0, 0, 0, 0]
    for m, ms in per_module.items():
        rs = [r for r in results if r["module"] == m]
        if not rs:
            continue
        equiv = sum(r["id"] in eq for r in rs)
        killed = sum(r["status"] == "failed" and r["id"] not in eq for r in rs)
        timeouts = sum(r["status"] == "timeout" and r["id"] not in eq for r in rs)
        surv = sum(r["status"] == "passed" and r["id"] not in eq for r in rs)
        score = f"{100 * killed / max(killed + surv, 1):.0f}%"
        lines.append(f"| {m} | {len(ms)} | {len(rs)} | {killed} | {surv} | {timeouts} | {equiv} | {score} |")
        for i, v in enumerate((len(rs), killed, surv, timeouts, equiv)):
            tot[i] += v
    score = 100 * tot[1] / max(tot[1] + tot[2], 1)
    strict = 100 * tot[1] / max(tot[1] + tot[2] + tot[3], 1)
    lines.append(f"| **all** | {sum(len(ms) for ms in per_module.values())} | {tot[0]} | {tot[1]} | {tot[2]} | "
                 f"{tot[3]} | {tot[4]} | **{score:.1f}%** |")
    lines += ["", "Score = killed / (killed + survived); equivalent mutants (docs/mutation.md) left out, and so are "
              "timeouts (a loaded machine can time out a survivor).",
              f"Counting every timeout as a survivor: {strict:.1f}%.", "", "## Surviving mutants", ""]
    for r in results:
        if r["status"] == "passed" and r["id"] not in eq:
            lines.append(f"- `{r['id']}`: `{r['original']}` => `{r['replacement']}`")
    lines += ["", "## Timed out", ""]
    for r in results:
        if r["status"] == "timeout" and r["id"] not in eq:
            lines.append(f"- `{r['id']}`: `{r['original']}` => `{r['replacement']}`")
    lines += ["", "## Equivalent mutants seen", ""]
    for r in results:
        if r["id"] in eq:
            lines.append(f"- `{r['id']}` ({r['status']}): {eq[r['id']]}")
    report = "\n".join(lines) + "\n"
    (args.out / "report.md").write_text(report)
    print(report)
    print(f"report: {args.out / 'report.md'}; every result: {args.out / 'results.jsonl'}")


if __name__ == "__main__":
    sys.exit(main())
