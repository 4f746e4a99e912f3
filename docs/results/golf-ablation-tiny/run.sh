#!/usr/bin/env bash
# The golf-switch ablation of issue #19 (docs/LOG.md, speedrun): the `tiny` preset at its own budget (250 steps,
# 16 x 256 tokens a step, AdamW) on the embedded corpus, seeds 0 and 1 (a seed fixes the init and the batches, so
# every cell sees the same tokens). One single-run sweep folder per (cell, seed), seed 0 of every cell first;
# then `jaxchat report` over all of them groups the runs by the config keys that differ.
# Usage: docs/results/golf-ablation-tiny/run.sh OUT   (rerunning finishes an interrupted one)
set -euo pipefail
OUT=${1:?give the output folder}
JAXCHAT=${JAXCHAT:-jaxchat}
GOLF="--set model.residual_lambdas=false --set model.golf_block=true"
declare -A CELLS=(
  [nanochat-block]=""
  [golf-block]="$GOLF"
  [golf+partial-rope]="$GOLF --set model.rope_dims=16"
  [golf+ln-scale]="$GOLF --set model.ln_scale=true"
  [golf+bigram]="$GOLF --set model.bigram_buckets=2048 --set model.bigram_dim=64"
  [golf+unet]="$GOLF --set model.unet=true"
  [golf+smeargate]="$GOLF --set model.smear_v1=true --set model.smear=false"
  [golf+all]="$GOLF --set model.rope_dims=16 --set model.ln_scale=true --set model.bigram_buckets=2048 \
--set model.bigram_dim=64 --set model.unet=true --set model.smear_v1=true --set model.smear=false"
)
ORDER="nanochat-block golf-block golf+partial-rope golf+ln-scale golf+bigram golf+unet golf+smeargate golf+all"
for seed in 0 1; do
  for cell in $ORDER; do
    # shellcheck disable=SC2086
    $JAXCHAT sweep --out "$OUT/$cell-seed$seed" --preset tiny --seeds "$seed" --parallel 1 ${CELLS[$cell]}
  done
done
$JAXCHAT report "$OUT"/*/runs/* --metric val_bpb --out "$OUT/report"
