"""Build a small conversation set from the embedded corpus (the stdlib sources jaxchat pretrains on): for every
top-level function with a docstring, a user asks what `module.function` does and the assistant answers with the
docstring's first paragraph. The JSONL is the SmolTalk shape `jaxchat sft --data` reads (docs/chat.md).

    python scripts/make_docstring_chats.py --out runs/docchats.jsonl [--max-chars 240] [--limit 3000]

The questions vary in wording (a fixed cycle, so the file is the same on every run); answers longer than
--max-chars are cut at the last sentence end before it (or dropped when none), so a conversation fits a short
context. Output is written atomically and an existing file is kept unless --force.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

from jaxchat.data.corpus import stdlib_documents
from jaxchat.fileio import write_jsonl_atomic

QUESTIONS = ("What does {name} do?", "Explain {name}.", "What is {name} for?", "Describe the function {name}.")


def module_name(doc_name: str) -> str:
    """'json/decoder.py' -> 'json.decoder'; 'os.py' -> 'os'; a package's __init__ is the package."""
    parts = doc_name.removesuffix(".py").split("/")
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def first_paragraph(doc: str, max_chars: int) -> str | None:
    """The docstring's first paragraph on one line, cut to whole sentences within max_chars (None if none fit)."""
    para = " ".join(doc.strip().split("\n\n")[0].split())
    if len(para) <= max_chars:
        return para or None
    cut = max((m.end() for m in re.finditer(r"[.!?](?=\s)", para[:max_chars + 1])), default=0)
    return para[:cut] if cut else None


def conversations(max_chars: int, limit: int):
    n = 0
    for name, text in stdlib_documents():
        if not name.endswith(".py"):
            continue
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            answer = first_paragraph(doc, max_chars) if doc else None
            if not answer:
                continue
            qualified = f"{module_name(name)}.{node.name}"
            question = QUESTIONS[n % len(QUESTIONS)].format(name=f"`{qualified}`")
            yield {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
            n += 1
            if n >= limit:
                return


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the .jsonl file to write")
    p.add_argument("--max-chars", type=int, default=240, help="longest answer, in characters")
    p.add_argument("--limit", type=int, default=3000, help="most conversations")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.exists() and not args.force:
        print(f"{out} exists: pass --force to overwrite it", file=sys.stderr)
        return 2
    rows = list(conversations(args.max_chars, args.limit))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(out, rows)
    print(f"{out}: {len(rows)} conversations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
