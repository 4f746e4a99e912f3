"""A config from the command line: `--config FILE` (a run's config.json, or a TOML file with [model], [optim],
[data] and [train] tables, every key optional) and `--set section.key=value` overrides on top (every key a
config has; the text of a value turned into its field's type, with an error that names the key and the value)."""

from __future__ import annotations

import difflib
import json
import tomllib
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, get_type_hints

from jaxchat.config import Config, ConfigError


def _parse_value(key: str, raw: str, typ: Any) -> Any:
    if typ is bool:
        low = raw.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--set {key}={raw!r}: expected a boolean (true/false)")
    if typ is int:
        try:
            f = float(raw.replace("_", ""))
        except ValueError:
            raise ConfigError(f"--set {key}={raw!r}: expected an integer, e.g. {key}=128") from None
        if not f.is_integer():
            raise ConfigError(f"--set {key}={raw!r}: expected an integer, got a fraction")
        return int(f)
    if typ is float:
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"--set {key}={raw!r}: expected a number, e.g. {key}=3e-4") from None
    return raw


def all_keys() -> list[str]:
    out = []
    for section in fields(Config):
        cls = get_type_hints(Config)[section.name]
        out += [f"{section.name}.{f.name}" for f in fields(cls)]
    return out


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `section.key=value` strings. Keys may omit the section when the name is unique."""
    keys = all_keys()
    by_short: dict[str, list[str]] = {}
    for k in keys:
        by_short.setdefault(k.split(".", 1)[1], []).append(k)
    changes: dict[str, dict[str, Any]] = {f.name: {} for f in fields(Config)}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set train.num_steps=100")
        key, raw = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in keys:
            full = by_short.get(key, [])
            if len(full) == 1:
                key = full[0]
            else:
                close = difflib.get_close_matches(key, keys + list(by_short), n=3, cutoff=0.5)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                raise ConfigError(f"--set {item!r}: unknown key {key!r}.{hint} "
                                  f"Run `jaxchat presets --keys` to list every key.")
        section, name = key.split(".", 1)
        typ = get_type_hints(type(getattr(cfg, section)))[name]
        changes[section][name] = _parse_value(key, raw, typ)
    # each section is rebuilt once with all its changes, so checks that tie fields together see the final values
    sections = {name: replace(getattr(cfg, name), **kw) if kw else getattr(cfg, name) for name, kw in changes.items()}
    return Config(**sections)


def config_from_file(path: str | Path) -> Config:
    """The Config a JSON (a run's config.json) or TOML file describes; missing keys take their defaults."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file; pass a run's config.json or a TOML file with [model], "
                          f"[optim], [data] and [train] tables")
    try:
        doc = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {path} does not parse ({'TOML' if path.suffix == '.toml' else 'JSON'}): "
                          f"{e}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"--config {path}: expected a table of sections (model, optim, data, train)")
    try:
        return Config.from_dict(doc)
    except TypeError as e:
        raise ConfigError(f"--config {path}: {e}") from None
