#!/usr/bin/env bash
# Kill a `tiny` run with kill -9 in the middle of a checkpoint save, resume it, and compare its loss curve and
# final state with an uninterrupted run of the same config.
#
#   scripts/kill_resume_demo.sh [STEPS] [OUT]        (defaults: 30 steps, runs/demo)
#
# To land the kill inside a save every time, the save of step HOLD (2/3 of the way) is held by jaxchat's test
# hook (JAXCHAT_TEST_SAVE_DELAY=seconds@step) after Orbax has written its files and before the rename that
# commits it; training carries on meanwhile (saves are asynchronous), and the run is killed two steps later.
set -uo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-30}
OUT=${2:-runs/demo}
SAVE=5
HOLD=$(( (STEPS * 2 / 3) / SAVE * SAVE ))
JAXCHAT=${JAXCHAT:-.venv/bin/jaxchat}
PY=${PY:-.venv/bin/python}
SETS=(--set train.num_steps="$STEPS" --set train.save_every=$SAVE --set train.eval_every=10
      --set train.eval_tokens=8192 --set train.sample_tokens=16 --set train.log_every=1)
mkdir -p "$OUT"

echo "== 1. uninterrupted: jaxchat train --preset tiny --run-dir $OUT/straight --force ${SETS[*]}"
$JAXCHAT train --preset tiny --run-dir "$OUT/straight" --force "${SETS[@]}" > "$OUT/straight.log" 2>&1 || exit 1
tail -n 4 "$OUT/straight.log" | head -n 2

echo "== 2. the same run, killed with kill -9 while the save of step $HOLD is in flight"
rm -f "$OUT/held"
JAXCHAT_TEST_SAVE_DELAY="600@$HOLD" JAXCHAT_TEST_SAVE_MARKER="$OUT/held" \
  $JAXCHAT train --preset tiny --run-dir "$OUT/killed" --force "${SETS[@]}" > "$OUT/killed.log" 2>&1 &
PID=$!
until [ -s "$OUT/held" ]; do sleep 0.2; done
echo "   save of step $HOLD in flight: $(cat "$OUT/held")"
until grep -q "\"step\": $((HOLD + 2)), \"loss\"" "$OUT/killed/metrics.jsonl"; do sleep 0.2; done
kill -9 $PID; wait $PID 2>/dev/null
echo "   kill -9 $PID (exit status $?); last logged step: $(tail -n 1 "$OUT/killed/metrics.jsonl" | cut -c1-40)"
echo "   checkpoints/ now: $(ls "$OUT/killed/checkpoints" | tr '\n' ' ')"

echo "== 3. jaxchat train --run-dir $OUT/killed --resume"
$JAXCHAT train --run-dir "$OUT/killed" --resume > "$OUT/resume.log" 2>&1 || exit 1
grep -E "^resume|^resumed|^time" "$OUT/resume.log"
echo "   checkpoints/ now: $(ls "$OUT/killed/checkpoints" | tr '\n' ' ')"

echo "== 4. compare"
$PY - "$OUT/straight" "$OUT/killed" "$STEPS" <<'EOF'
import json, sys
import jax, numpy as np
from jaxchat.run import load_run
from jaxchat.checkpoint import Checkpointer
from jaxchat.rundir import load_run_config
from jaxchat.optim import build_optimizer
from jaxchat.train import ModelFns, abstract_state

a, b, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
def curve(run):
    return [(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, open(f"{run}/metrics.jsonl")) if "loss" in r]
def evals(run):
    return [(r["step"], r["val_loss"]) for r in map(json.loads, open(f"{run}/metrics.jsonl")) if "val_loss" in r]
ca, cb = curve(a), curve(b)
print(" step  uninterrupted      killed+resumed")
for (s, la, _), (_, lb, _) in zip(ca, cb):
    print(f"{s:5d}  {la:.10f}  {lb:.10f}{'' if la == lb else '   DIFFERENT'}")
def state(run):
    cfg = load_run_config(run); fns = ModelFns(cfg)
    st, _ = Checkpointer(run, read_only=True).restore(abstract_state(fns, build_optimizer(cfg, None)), steps)
    return jax.tree.leaves(st)
same = all(np.array_equal(x, y) for x, y in zip(state(a), state(b)))
sa, sb = (json.load(open(f"{r}/summary.json")) for r in (a, b))
print(f"steps logged once each: {[s for s, _, _ in cb] == list(range(1, steps + 1))}")
print(f"loss curve identical (loss and grad norm, bitwise): {ca == cb}")
print(f"evals identical: {evals(a) == evals(b)}")
print(f"final params + optimizer state identical: {same}")
print(f"val bpb: {sa['val_bpb']!r} vs {sb['val_bpb']!r}")
print(f"time split of the resumed run (s, over both processes): {sb['time_s']} = {sb['wall_s']} "
      f"(sum {sum(sb['time_s'].values()):.2f}); this process {sb['process_wall_s']}")
EOF
