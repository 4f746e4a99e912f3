"""Shared fixtures: the reference fixtures folder (tests/fixtures), a private dataset cache, a session-wide XLA
compilation cache."""

import json
import os
from pathlib import Path

import jax
import pytest
from jax._src import compilation_cache as cc  # JAX's own switch to re-read the cache settings (private API)

from jaxchat.compilation import enable_compilation_cache

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"  # the reference implementations' own outputs (tests/fixtures/README.md)
CACHE_MIN_COMPILE_S = 0.1  # tests compile many small programs more than once (the CLI's own threshold is 1 s)


def fixture_path(name: str) -> Path:
    """A reference fixture. They are part of the repository, so a missing one fails the test: skipping would let
    a parity check silently stop checking."""
    path = FIXTURES / name
    if not path.exists():
        pytest.fail(f"reference fixture {path} is missing: it is committed under tests/fixtures/ (see the README "
                    f"there for what made it); restore it with `git checkout -- tests/fixtures`", pytrace=False)
    return path


# `model.compute_dtype=auto` would be bfloat16 on a CPU with bf16 units (dtypes.cpu_has_bf16_units): the suite's
# fp32 reference checks pin this machine to fp32 whatever its CPU, child processes included (they inherit it).
os.environ["JAXCHAT_CPU_BF16"] = "0"


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Datasets prepared by tests go to a temporary cache, never the user's."""
    if "JAXCHAT_CACHE" not in os.environ:
        os.environ["JAXCHAT_CACHE"] = str(tmp_path_factory.mktemp("jaxchat-cache"))
    yield


@pytest.fixture(scope="session", autouse=True)
def compile_cache(private_cache):
    """jaxchat's persistent XLA compilation cache (jaxchat/compilation.py: train/eval/sample/bench turn it on) for
    the whole session and the child processes tests start (they inherit the environment): many tests build the
    same small model again, a new jit object each time (init_state, each run's train step, eval step and
    sampler), and only the first compile of a program is paid. It lives under the session's private
    JAXCHAT_CACHE, so it starts empty and can only dedupe, never serve another session's program. Its threshold
    is CACHE_MIN_COMPILE_S, not the CLI's 1 s: the tests' small programs compile in less. JAX decides once per
    process whether the cache is in use (at the first compile, which may come before any test), hence the reset.
    Restored afterwards."""
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    old = {k: getattr(jax.config, k) for k in keys}
    old_env = os.environ.get("JAXCHAT_COMPILE_CACHE_MIN_SECONDS")
    os.environ["JAXCHAT_COMPILE_CACHE_MIN_SECONDS"] = str(CACHE_MIN_COMPILE_S)
    path = enable_compilation_cache()
    cc.reset_cache()
    yield path
    if old_env is None:
        os.environ.pop("JAXCHAT_COMPILE_CACHE_MIN_SECONDS", None)
    else:
        os.environ["JAXCHAT_COMPILE_CACHE_MIN_SECONDS"] = old_env
    for k, v in old.items():
        jax.config.update(k, v)
    cc.reset_cache()


def child_env(**extra) -> dict:
    """Environment for a child `python -m jaxchat.cli ...`: CPU, this checkout's sources, the session's XLA cache."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT / "src"))
    if jax.config.jax_compilation_cache_dir:
        env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
    env.update({k: str(v) for k, v in extra.items()})
    return env


def records(run_dir):
    """The JSON records of a run's metrics.jsonl, in file order."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def curve(run_dir):
    """(step, loss, grad_norm) of every step record, in file order."""
    return [(r["step"], r["loss"], r["grad_norm"]) for r in records(run_dir) if "loss" in r]


def evals(run_dir):
    """(step, val_loss, val_bpb) of every evaluation record."""
    return [(r["step"], r["val_loss"], r["val_bpb"]) for r in records(run_dir) if "val_loss" in r]
