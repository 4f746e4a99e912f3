"""Shared fixtures: the reference fixtures folder, a private dataset cache, tiny configs."""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"


def fixture_path(name: str) -> Path:
    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"reference fixture {path} is absent (it lives in ../shared/fixtures beside the project)")
    return path


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Datasets prepared by tests go to a temporary cache, never the user's."""
    if "JAXCHAT_CACHE" not in os.environ:
        os.environ["JAXCHAT_CACHE"] = str(tmp_path_factory.mktemp("jaxchat-cache"))
    yield
