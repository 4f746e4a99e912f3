# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # jaxchat quickstart
#
# Train the `tiny` preset (a 4-layer GPT on jaxchat's embedded Python-stdlib corpus), plot its curves and sample
# from it. Runs on a laptop, on Colab's CPU runtime or on a Colab TPU runtime (the full 350 steps: about a minute
# of training on a 2-core CPU with bf16 units, ~1.5x that on one without).
#
# This notebook is generated from `notebooks/quickstart.py` (jupytext percent format): edit the `.py`, then
# `jupytext --to ipynb notebooks/quickstart.py`.

# %% [markdown]
# ## Install
#
# Skipped when jaxchat is already importable. Otherwise set `JAXCHAT_SOURCE` (an environment variable, or edit the
# line below) to where to install it from: the path of a checkout, or `git+https://...` of the jaxchat repository.
# On a TPU runtime JAX's TPU build is installed with it.

# %%
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

JAXCHAT_SOURCE = os.environ.get("JAXCHAT_SOURCE", "")

if importlib.util.find_spec("jaxchat") is None:
    if not JAXCHAT_SOURCE:
        raise SystemExit("jaxchat is not installed: set JAXCHAT_SOURCE to a checkout's path or to "
                         "git+https://<the jaxchat repository>, then run this cell again")
    on_tpu = bool(os.environ.get("COLAB_TPU_ADDR")) or any(Path("/dev").glob("accel*")) or Path("/dev/vfio").exists()
    extra = ["jax[tpu]"] if on_tpu else []
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"jaxchat[plot] @ {JAXCHAT_SOURCE}"
                    if JAXCHAT_SOURCE.startswith("git+") else f"{JAXCHAT_SOURCE}[plot]"] + extra, check=True)
else:
    print("jaxchat is already installed:", importlib.util.find_spec("jaxchat").origin)

# %%
import jax

import jaxchat

print("jaxchat", jaxchat.__version__, "| jax", jax.__version__, "| devices:", jax.devices())

# %% [markdown]
# ## Train `tiny`
#
# `jaxchat train` from Python (the same as the `jaxchat train ...` command line). `STEPS` defaults to the preset's
# 350; `QUICKSTART_STEPS` and `QUICKSTART_SET` (space-separated `key=value` overrides) make a shorter run.

# %%
from jaxchat.cli import main

RUN = Path(os.environ.get("QUICKSTART_RUN", "runs/quickstart"))
STEPS = int(os.environ.get("QUICKSTART_STEPS", "350"))
overrides = [f"train.num_steps={STEPS}"] + os.environ.get("QUICKSTART_SET", "").split()
argv = ["train", "--preset", "tiny", "--run-dir", str(RUN), "--force"]
for item in overrides:
    argv += ["--set", item]
assert main(argv) == 0, "training failed: see the message above"

# %% [markdown]
# ## Curves
#
# Every step's loss and every evaluation's validation bits per byte are in the run's `metrics.jsonl`.

# %%
import json

import matplotlib

if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")  # run as a script: write the figure, do not open a window
import matplotlib.pyplot as plt

records = [json.loads(line) for line in (RUN / "metrics.jsonl").read_text().splitlines()]
train = [(r["step"], r["loss"]) for r in records if "loss" in r]
val = [(r["step"], r["val_bpb"]) for r in records if "val_bpb" in r]
summary = json.loads((RUN / "summary.json").read_text())

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
ax1.plot(*zip(*train))
ax1.set(xlabel="step", ylabel="train loss (nats/token)", title="training loss")
ax2.plot(*zip(*val), marker="o", label="jaxchat")
ax2.axhline(summary["gzip_bpb"], color="gray", linestyle="--", label="gzip -9")
ax2.axhline(summary["xz_bpb"], color="black", linestyle=":", label="xz -9e")
ax2.set(xlabel="step", ylabel="bits per byte", title="validation bits per byte")
ax2.legend()
fig.tight_layout()
fig.savefig(RUN / "curves.png", dpi=100)
print(f"final val bpb {summary['val_bpb']:.3f} (gzip -9: {summary['gzip_bpb']:.3f}, xz -9e: {summary['xz_bpb']:.3f})")
plt.show()

# %% [markdown]
# ## Sample

# %%
assert main(["sample", "--run", str(RUN), "--prompt", "def ", "--max-tokens", "64", "--temperature", "0.8"]) == 0
