#!/usr/bin/env bash
# uvd-spine: a parent model fine-tuned into the spine6 schema (vertebral body, disc, posterior elements,
# spinal canal, sacrum) on every source of ../shared/data: lumbar-mr (training cases of
# scripts/recipes/lumbar-mr-split.json), spider-t2space and t1-levels (training cases of
# scripts/recipes/new-sources-split.json), sources balanced, `domain` intensity augmentation.
#   scripts/train_spine6.sh OUT [PARENT] [extra lumbarseg-train options, e.g. --resume]
# PARENT defaults to the shipped uvd-starter@5. Validates at the end on three lumbar-mr validation cases
# (one per vertebral-body source); the other validation cases of both splits stay unseen for choosing.
# --l2sp 0: every source the parent knew is in the training data, so the fine-tune default's spring back
# to the parent's weights (made for a team's 20-slice fine-tune) is not needed, and with it the new
# classes were not learned at all (1300 steps: spinal canal and sacrum Dice 0.00; docs/lab/spine6-sources.md).
# --replay 0 --wise 1: the cases already hold every source, and the package is the run's own weights.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
OUT="$1"; shift
PARENT="${1:-uvd-starter@5}"; [ $# -gt 0 ] && shift
SHARED="${SHARED:-../shared/data}"
PY="${PYTHON:-python}"
VAL="VB1_10,VB2_05,VB3_04"
CASES=$("$PY" scripts/training_cases.py "$SHARED" scripts/recipes/lumbar-mr-split.json "$VAL")
# MINUTES (default 42): wall-clock budget that shortens the schedule to fit; MINUTES=0: the full --epochs
BUDGET=()
[ "${MINUTES:-42}" != 0 ] && BUDGET=(--max-minutes "${MINUTES:-42}" --budget-clock wall)
REG=()
case "$PARENT" in *@*|uvd-*) REG=(--registry Resources/Models);; esac
exec "$PY" -m LumbarSegmentLib.training.cli finetune --from "$PARENT" "${REG[@]}" --schema spine6 \
  --data "$SHARED/lumbar-mr,$SHARED/spider-t2space,$SHARED/t1-levels" --cases "$CASES" --val-cases "$VAL" \
  --patch 192 --batch-size 4 --steps-per-epoch 10 --epochs 360 --warmup-steps 10 --lr 3e-4 --val-every 1000 --val-stride 4 \
  --patience 0 --l2sp 0 --replay 0 --wise 1 \
  --unannotated-bg-weight 0.05 --precision bf16 --threads 2 --balance sources --intensity-aug domain \
  ${BUDGET[@]+"${BUDGET[@]}"} --name uvd-spine --out "$OUT" "$@"
