"""notebooks/quickstart.py (the jupytext source) and the .ipynb beside it hold the same cells; the slow suite
runs the .py end to end (a short `tiny` run, the curves figure, a sample)."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, child_env

jupytext = pytest.importorskip("jupytext", reason="the notebook is generated with jupytext (in the test extra)")

NOTEBOOKS = ROOT / "notebooks"


def cells(nb):
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def test_ipynb_is_generated_from_the_py():
    py = jupytext.read(NOTEBOOKS / "quickstart.py")
    ipynb = jupytext.read(NOTEBOOKS / "quickstart.ipynb")
    assert len(py.cells) >= 8 and any("jaxchat.cli import main" in c.source for c in py.cells)
    assert cells(py) == cells(ipynb), ("notebooks/quickstart.ipynb is out of date: regenerate it with "
                                       "`jupytext --to ipynb notebooks/quickstart.py`")
    assert all(not c.get("outputs") for c in ipynb.cells if c.cell_type == "code")  # committed without outputs


@pytest.mark.slow
def test_quickstart_runs(tmp_path):
    run = tmp_path / "run"
    env = child_env(QUICKSTART_RUN=run, QUICKSTART_STEPS=10,
                    QUICKSTART_SET="train.eval_every=5 train.eval_tokens=4096 data.max_train_chars=300000",
                    MPLBACKEND="Agg")
    p = subprocess.run([sys.executable, str(NOTEBOOKS / "quickstart.py")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "jaxchat is already installed" in p.stdout and "final val bpb" in p.stdout
    assert (run / "curves.png").stat().st_size > 10_000
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == list(range(1, 11))
