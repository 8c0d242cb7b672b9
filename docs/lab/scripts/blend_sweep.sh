#!/usr/bin/env bash
# The eleventh round of docs/validation.md: how much augmentation a fine-tune can give up for fit
# before a never-seen source pays for it. Every run twice: on the 53 training cases of the v1 split
# from the shipped default (`uvd-starter@4`; the known sources), and on the 14 training cases of the
# sources other than water-fat from a model that never saw water-fat (scored on water-fat: the
# unseen source). Both halves share the recipe flags, so what a recipe does to one table it does to
# the other.
#
#   bash docs/lab/scripts/blend_sweep.sh            # all of it: about 3 h 20 min of 2 CPU cores with bf16
#   OUT=runs/blend DATA=../shared/data/lumbar-mr bash docs/lab/scripts/blend_sweep.sh
#
# Two lanes run side by side, one thread each; each lane's log is OUT/lane-<k|l>.log. The scores are
# in OUT/eval-*/metrics.md (level-range Dice and surface Dice per source). The clean test split is
# scored separately with scripts/validation_report.py (docs/validation.md gives the command).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
DATA="${DATA:-../shared/data/lumbar-mr}"
OUT="${OUT:-runs/blend}"
mkdir -p "$OUT"
SPLIT=scripts/recipes/lumbar-mr-split.json
TV="$(python - "$DATA" "$SPLIT" <<'PY'
import json, sys
from pathlib import Path
held = set(json.loads(Path(sys.argv[2]).read_text())["test"])
print(",".join(sorted(p.stem for p in Path(sys.argv[1]).glob("*.json") if p.stem not in held)))
PY
)"
VAL=VB1_10,VB2_05,VB2_17,VB3_04,VB3_15,VB3_25,VB3_35,VB3_46
NOWF=IVD_11,IVD_20,VB1_07,VB1_10,VB1_11,VB1_15,VB1_17,VB2_02,VB2_04,VB2_05,VB2_07,VB2_08,VB2_09,VB2_10,VB2_17,VB2_18,VB2_20
RUN="--patch 192 --batch-size 8 --steps-per-epoch 60 --unannotated-bg-weight 0.05 --precision bf16 --threads 1 \
  --val-stride 4 --patience 0 --balance sources"
KNOWN="--registry Resources/Models --data $DATA --cases $TV --val-cases $VAL $RUN --name uvd-starter"
LOSO="--data $DATA --cases $NOWF --val-cases VB1_10,VB2_05,VB2_17 $RUN"
FIT="--lr 3e-4 --intensity-aug domain"          # + --augment-share P: the share of patches augmented at all
TAIL="--lr 1e-4 --intensity-aug domain"         # every patch augmented, a third of the fit's rate
UNSEEN=VB3_04,VB3_15,VB3_25,VB3_35,VB3_46,VB1_10,VB2_05,VB2_17

known() {  # the known-source lane, from the shipped default
  local k=lumbarseg-train
  $k finetune --from uvd-starter@4 $KNOWN $FIT --epochs 16 --val-every 16 --augment-share 0.5 --out "$OUT/k-share50"
  $k finetune --from uvd-starter@4 $KNOWN $FIT --epochs 16 --val-every 16 --augment-share 0.25 --out "$OUT/k-share25"
  $k finetune --from "$OUT/k-share50/package" $KNOWN $TAIL --epochs 4 --val-every 4 --out "$OUT/k-share50-tail"
  $k finetune --from uvd-starter@4 $KNOWN $FIT --epochs 32 --val-every 32 --augment-share 0.5 --out "$OUT/k-long"
  $k finetune --from "$OUT/k-long/package" $KNOWN $TAIL --epochs 8 --val-every 8 --out "$OUT/k-long-tail"
  $k evaluate --model "uvd-starter@4,$OUT/k-share50/package,$OUT/k-share25/package,$OUT/k-share50-tail/package,$OUT/k-long/package,$OUT/k-long-tail/package" \
    --registry Resources/Models --data "$DATA" --cases "$VAL" --threads 1 --out "$OUT/eval-val"
  # the two candidate ensembles of the new default (two forward passes per window)
  $k evaluate --model "$OUT/k-long-tail/package+uvd-partner@2,$OUT/k-long-tail/package+$OUT/k-long/package" \
    --registry Resources/Models --data "$DATA" --cases "$VAL" --threads 1 --out "$OUT/eval-val-ensembles"
}

loso() {  # the leave-water-fat-out lane: the same recipes from a model that never saw water-fat
  local k=lumbarseg-train S="$OUT/nowf-domain-s1/package"
  $k train --data "$DATA" --cases "$NOWF" --val-cases VB1_10,VB2_05,VB2_17 --variant UVD --init-filters 16 --lr 1e-3 \
    --epochs 10 --batch-size 8 --patch 192 --precision bf16 --threads 1 --val-every 5 --val-stride 3 --patience 0 \
    --intensity-aug domain --unannotated-bg-weight 0.05 --seed 1 --name uvd-nowf-domain --out "$OUT/nowf-domain-s1"
  $k finetune --from "$S" $LOSO $FIT --epochs 8 --val-every 8 --name nowf-domain480 --out "$OUT/l-domain"
  $k finetune --from "$S" $LOSO $FIT --epochs 16 --val-every 16 --augment-share 0.5 --name nowf-share50 --out "$OUT/l-share50"
  $k finetune --from "$S" $LOSO $FIT --epochs 16 --val-every 16 --augment-share 0.25 --name nowf-share25 --out "$OUT/l-share25"
  $k finetune --from "$OUT/l-share50/package" $LOSO $TAIL --epochs 4 --val-every 4 --name nowf-share50-tail --out "$OUT/l-share50-tail"
  $k finetune --from "$S" $LOSO $FIT --epochs 32 --val-every 32 --augment-share 0.5 --name nowf-long --out "$OUT/l-long"
  $k finetune --from "$OUT/l-long/package" $LOSO $TAIL --epochs 8 --val-every 8 --name nowf-long-tail --out "$OUT/l-long-tail"
  # a second seed of the long recipe and of its control
  $k finetune --from "$S" $LOSO $FIT --epochs 32 --val-every 32 --augment-share 0.5 --seed 1 --name nowf-long-s1 --out "$OUT/l-long-s1"
  $k finetune --from "$OUT/l-long-s1/package" $LOSO $TAIL --epochs 8 --val-every 8 --seed 1 --name nowf-long-tail-s1 --out "$OUT/l-long-tail-s1"
  $k finetune --from "$S" $LOSO $FIT --epochs 8 --val-every 8 --seed 1 --name nowf-domain480-s1 --out "$OUT/l-domain-s1"
  # a closing pass twice as long (480 more steps with every patch augmented), both seeds
  $k finetune --from "$OUT/l-long-tail/package" $LOSO $TAIL --epochs 8 --val-every 8 --name nowf-long-tail2 --out "$OUT/l-long-tail2"
  $k finetune --from "$OUT/l-long-tail-s1/package" $LOSO $TAIL --epochs 8 --val-every 8 --seed 1 --name nowf-long-tail2-s1 \
    --out "$OUT/l-long-tail2-s1"
  $k evaluate --model "$OUT/l-long-tail2/package,$OUT/l-long-tail2-s1/package" --data "$DATA" --cases "$UNSEEN" --threads 1 \
    --out "$OUT/eval-loso-tail2"
  $k evaluate --model "$S,$OUT/l-domain/package,$OUT/l-share50/package,$OUT/l-share25/package,$OUT/l-share50-tail/package,$OUT/l-long/package,$OUT/l-long-tail/package,$OUT/l-long-tail-s1/package,$OUT/l-domain-s1/package" \
    --data "$DATA" --cases "$UNSEEN" --threads 1 --out "$OUT/eval-loso"
}

known > "$OUT/lane-k.log" 2>&1 &
loso > "$OUT/lane-l.log" 2>&1 &
wait
echo "scores: $OUT/eval-val/metrics.md (known sources), $OUT/eval-loso/metrics.md (VB3 rows: the unseen source)"
