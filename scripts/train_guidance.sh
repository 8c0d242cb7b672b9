#!/usr/bin/env bash
# uvd-guide: the click-guided model (docs/refine.md), fine-tuned from a drafting package with click maps as
# extra inputs, on the training cases of every source of ../shared/data: lumbar-mr (not the test or
# validation cases of scripts/recipes/lumbar-mr-split-v2.json), spider-t2space and t1-levels (training
# cases of scripts/recipes/new-sources-split.json).
#   scripts/train_guidance.sh OUT [PARENT] [extra options, e.g. --resume]
# PARENT defaults to the shipped uvd-starter@5. MINUTES (default 45): wall-clock budget.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
OUT="$1"; shift
PARENT="${1:-uvd-starter@5}"; [ $# -gt 0 ] && shift
SHARED="${SHARED:-../shared/data}"
PY="${PYTHON:-python}"
CASES=$("$PY" scripts/training_cases.py "$SHARED" scripts/recipes/lumbar-mr-split-v2.json)
REG=()
case "$PARENT" in *@*|uvd-*) REG=(--registry Resources/Models);; esac
exec "$PY" -m LumbarSegmentLib.training.cli guidance --from "$PARENT" "${REG[@]}" \
  --data "$SHARED/lumbar-mr,$SHARED/spider-t2space,$SHARED/t1-levels" --cases "$CASES" \
  --steps "${STEPS:-2400}" --batch-size 4 --patch 192 --lr 2e-4 --max-clicks 4 --radius-mm 3 --reach-mm 4 \
  --precision auto --threads "${THREADS:-2}" --max-minutes "${MINUTES:-45}" --name uvd-guide --out "$OUT" --prior "$@"
