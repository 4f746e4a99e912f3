"""The import graph of src/jaxchat: no cycles among module-level imports, and every module imports on its own.

Imports inside functions hide cycles (a module that only works once another has been imported first); the
house rule is imports at the top, so the graph read from module level is the real one.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import child_env

SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


# Files jaxchat writes into Hugging Face exports, imported by transformers from there (they need torch): data of
# the package, not modules of it.
NOT_MODULES = SRC / "jaxchat" / "interop" / "hf_files"


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / "jaxchat").rglob("*.py")) if NOT_MODULES not in p.parents}


def top_level_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The jaxchat modules `name` imports at module level (not inside functions or classes)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.Try, ast.If)):
            nodes = [n for block in (node.body, getattr(node, "orelse", [])) for n in block]
        else:
            nodes = [node]
        for n in nodes:
            if isinstance(n, ast.Import):
                targets = [a.name for a in n.names]
            elif isinstance(n, ast.ImportFrom):
                base = n.module or ""
                if n.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - n.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in n.names]
            else:
                continue
            out.update(t for t in targets if t in known and t != name)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycles():
    mods = modules()
    graph = {m: top_level_imports(m, p, set(mods)) for m, p in mods.items()}
    assert sum(len(v) for v in graph.values()) > 50  # the graph was read (not trivially empty)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.slow
def test_every_module_imports_on_its_own():
    failed = []
    for m in modules():
        p = subprocess.run([sys.executable, "-c", f"import {m}"], capture_output=True, text=True, env=child_env())
        if p.returncode and "pip install 'jaxchat[" not in p.stderr:  # (a module of an optional extra says which)
            failed.append(f"{m}: {p.stderr.strip().splitlines()[-1]}")
    assert not failed, "\n".join(failed)


def test_the_lm_eval_model_without_lm_eval_names_the_extra():
    """jaxchat.evals.harness needs lm_eval (the `lmeval` extra); without it the import says what to install."""
    code = ("import sys; sys.modules['lm_eval'] = None\n"
            "try:\n    import jaxchat.evals.harness\nexcept ImportError as e:\n    print(e)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), timeout=300)
    assert p.returncode == 0, p.stderr
    assert "pip install 'jaxchat[lmeval]'" in p.stdout
