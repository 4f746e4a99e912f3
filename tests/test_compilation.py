"""The persistent compilation cache: where it lives, how to turn it off, and that a second process really loads
the compiled program from it instead of compiling again."""

import json
import os
import subprocess
import sys

import jax

from jaxchat.cli import main
from jaxchat.compilation import compilation_cache_dir

PROBE = """
import json, sys
import jax, jax.numpy as jnp
from jaxchat.compilation import enable_compilation_cache
path = enable_compilation_cache()
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # store even this small program
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
jax.jit(lambda x: jnp.tanh(x @ x.T).sum()).lower(jnp.ones((32, 32))).compile()
print(json.dumps({"path": str(path), "hit": "/jax/compilation_cache/cache_hits" in events,
                  "miss": "/jax/compilation_cache/cache_misses" in events}))
"""


def probe(env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_second_process_loads_the_compiled_program(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("JAXCHAT_COMPILE_CACHE", "JAX_COMPILATION_CACHE_DIR")}
    env["JAXCHAT_CACHE"] = str(tmp_path)
    first, second = probe(env), probe(env)
    assert first["path"] == str(tmp_path / "xla")
    assert first["miss"] and not first["hit"]
    assert second["hit"] and not second["miss"]
    assert any((tmp_path / "xla").iterdir())
    env["JAXCHAT_COMPILE_CACHE"] = "off"
    assert probe(env) == {"path": "None", "hit": False, "miss": False}


def test_cache_dir_choices(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("JAXCHAT_CACHE", str(tmp_path))
    monkeypatch.delenv("JAXCHAT_COMPILE_CACHE", raising=False)
    assert compilation_cache_dir() == tmp_path / "xla"
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax-own"))
    assert compilation_cache_dir() == tmp_path / "jax-own"  # JAX's own setting is respected
    monkeypatch.setenv("JAXCHAT_COMPILE_CACHE", str(tmp_path / "mine"))
    assert compilation_cache_dir() == tmp_path / "mine"
    monkeypatch.setenv("JAXCHAT_COMPILE_CACHE", "off")
    assert compilation_cache_dir() is None


def test_commands_that_compile_turn_it_on(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.delenv("JAXCHAT_COMPILE_CACHE", raising=False)
    monkeypatch.setenv("JAXCHAT_CACHE", str(tmp_path))
    before = jax.config.jax_compilation_cache_dir
    try:
        assert main(["eval", "--run", str(tmp_path / "no-such-run")]) == 2  # fails after the cache is set up
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_bad_threshold_is_named(monkeypatch, tmp_path):
    import pytest

    from jaxchat.compilation import enable_compilation_cache
    from jaxchat.config import ConfigError

    monkeypatch.setenv("JAXCHAT_COMPILE_CACHE", str(tmp_path))
    monkeypatch.setenv("JAXCHAT_COMPILE_CACHE_MIN_SECONDS", "soon")
    with pytest.raises(ConfigError, match="JAXCHAT_COMPILE_CACHE_MIN_SECONDS='soon'"):
        enable_compilation_cache()


def test_unwritable_cache_dir_warns_and_compiles_on(monkeypatch, tmp_path, capsys):
    from jaxchat.compilation import enable_compilation_cache

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("JAXCHAT_COMPILE_CACHE", str(blocker / "xla"))
    assert enable_compilation_cache() is None
    assert f"cannot create {blocker / 'xla'}" in capsys.readouterr().err
