#!/bin/bash
# One device call of a session with a GPU: the environment, the GPU tests, then a suite plan. Everything lands in
# OUTDIR (log.txt, suite/rows.md, suite/results.jsonl, suite/trace_summary.txt): at most 2 folders down and few
# files, as the device tool brings back.
#
#   JAXCHAT_COMMIT=<hash> [GPU_TESTS_XLA_FLAGS=...] bash benchmarks/gpu_session.sh PLAN OUTDIR [SUITE_BUDGET_S]
#   e.g. on the device: JAXCHAT_COMMIT=$(git rev-parse HEAD here) bash benchmarks/gpu_session.sh h100-s6 $OUT 420
#
# JAXCHAT_COMMIT names the code in every row (the device's copy of the checkout may carry a stale .git).
set -u
PY=${PY:-python3}  # the device image's python carries jax; elsewhere e.g. PY=.venv/bin/python
PLAN=${1:?usage: gpu_session.sh PLAN OUTDIR [SUITE_BUDGET_S]}
OUT=${2:?usage: gpu_session.sh PLAN OUTDIR [SUITE_BUDGET_S]}
BUDGET=${3:-420}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 JAXCHAT_COMPILE_CACHE=off
mkdir -p "$OUT"
L=$OUT/log.txt
{ echo "=== environment (commit ${JAXCHAT_COMMIT:-unset})"
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
  $PY -m pip list 2>/dev/null | grep -iE "^(jax|jaxlib|jax-cuda[0-9]+-plugin|flax|orbax-checkpoint|nvidia-cudnn-cu[0-9]+) "
} > "$L" 2>&1
# GPU_TESTS_XLA_FLAGS: XLA flags for the GPU tests only (to check a flag before it becomes a default)
echo "=== pytest -m gpu tests (XLA_FLAGS=${GPU_TESTS_XLA_FLAGS:-})" >> "$L"
XLA_FLAGS=${GPU_TESTS_XLA_FLAGS:-} timeout 240 $PY -m pytest -q -m gpu tests -p no:cacheprovider >> "$L" 2>&1
echo "pytest rc $?" >> "$L"
echo "=== python benchmarks/suite.py $PLAN --budget $BUDGET" >> "$L"
$PY benchmarks/suite.py "$PLAN" --out "$OUT/suite" --budget "$BUDGET" >> "$L" 2>&1
echo "=== done (suite rc $?)" >> "$L"
