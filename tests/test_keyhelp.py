"""`jaxchat presets --keys`: every key --set accepts, with type, default and a line of help from config.py."""

import subprocess
import sys

from conftest import child_env
from jaxchat.keyhelp import key_rows
from jaxchat.overrides import all_keys


def test_every_key_has_type_default_and_help():
    rows = key_rows()
    assert [r[0] for r in rows] == all_keys() and len(rows) > 60
    missing = [k for k, _, _, h in rows if len(h) < 8]
    assert not missing, f"config fields without a trailing help comment in config.py: {missing}"
    by_key = {k: (t, d, h) for k, t, d, h in rows}
    assert by_key["optim.lr"] == ("float", "0.01", "peak learning rate (adamw)")
    assert by_key["model.scan_layers"][:2] == ("bool", "False")
    assert "relu2, leaky_relu2, gelu, swiglu" in by_key["model.mlp"][2]  # the choices spelled out
    # marin's switches and XSA; a help comment continued on the next line is read whole
    assert by_key["model.rope_partial"][2].endswith("pairs (i, i + D/2) as everywhere)")
    assert "zero_freqs" in by_key["model.rope_partial"][2] and "frequency slots" in by_key["model.rope_partial"][2]
    assert "rotate_half" in by_key["model.rope_rotate_half"][2]
    assert by_key["model.backout_layer"][:2] == ("int", "-1") and "L//2" in by_key["model.backout_layer"][2]
    assert by_key["model.xsa_layers"][:2] == ("int", "0") and "XSA" in by_key["model.xsa_layers"][2]
    assert "marin" in by_key["model.init"][2]  # INIT_SCHEMES spelled out
    assert by_key["train.max_seconds"][2].endswith("warms down by wall clock (optim/golf.py)")


def test_presets_keys_cli():
    p = subprocess.run([sys.executable, "-m", "jaxchat.cli", "presets", "--keys"], capture_output=True, text=True,
                       env=child_env(), timeout=120)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].split() == ["key", "type", "default", "help"]
    row = next(line for line in lines if line.startswith("train.num_steps "))
    assert row.split()[1:3] == ["int", "1000"] and "derive" in row
