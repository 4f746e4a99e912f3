"""`jaxchat presets --keys`: every config key with its type, default and one line of help.

The help is the comment that ends the field's line in config.py (`lr: float = 0.01  # peak learning rate`), read
from the source with `tokenize`, so the dataclasses stay the one place a key is described: adding a field with a
trailing comment is all it takes (tests/test_keyhelp.py fails for a field without one). A comment too long for
one line goes on in comment-only lines right below, indented past the `#` (`    #     more text`): those lines
are part of the help.
"""

from __future__ import annotations

import ast
import functools
import inspect
import io
import re
import tokenize
from dataclasses import MISSING, fields
from typing import get_type_hints

from jaxchat import config as config_module
from jaxchat.config import Config


@functools.lru_cache(maxsize=1)
def field_comments() -> dict[tuple[str, str], str]:
    """{(class name, field name): its trailing comment} for the dataclasses of config.py."""
    source = inspect.getsource(config_module)
    lines = source.splitlines()
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}

    def continued(line_no: int) -> bool:  # a comment-only line indented past its `#`: the help goes on
        line = lines[line_no - 1].lstrip() if line_no <= len(lines) else ""
        return line_no in comments and line.startswith("#  ")
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef):
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    text = comments.get(stmt.end_lineno)
                    line_no = stmt.end_lineno + 1
                    while text and continued(line_no):
                        text, line_no = f"{text} {comments[line_no]}", line_no + 1
                    if text:
                        out[(node.name, stmt.target.id)] = text
    return out


def expand_constants(text: str) -> str:
    """`one of MLP_KINDS` -> `one of MLP_KINDS (relu2, leaky_relu2, ...)`: the choices a comment names, spelled out."""
    def spell(match):
        value = getattr(config_module, match.group(0), None)
        if isinstance(value, tuple) and all(isinstance(v, str) for v in value):
            return f"{match.group(0)} ({', '.join(value)})"
        return match.group(0)
    return re.sub(r"\b[A-Z][A-Z_]{3,}\b", spell, text)


def key_rows() -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every key `--set` accepts, in config order."""
    rows, comments = [], field_comments()
    for section in fields(Config):
        cls = get_type_hints(Config)[section.name]
        hints = get_type_hints(cls)
        for f in fields(cls):
            default = f.default if f.default is not MISSING else f.default_factory()
            rows.append((f"{section.name}.{f.name}", getattr(hints[f.name], "__name__", str(hints[f.name])),
                         repr(default), expand_constants(comments.get((cls.__name__, f.name), ""))))
    return rows


def format_keys() -> str:
    rows = key_rows()
    wk, wt, wd = (max(len(r[i]) for r in rows) for i in range(3))
    head = f"{'key':<{wk}}  {'type':<{wt}}  {'default':<{wd}}  help"
    return "\n".join([head] + [f"{k:<{wk}}  {t:<{wt}}  {d:<{wd}}  {h}" for k, t, d, h in rows])
