#!/usr/bin/env bash
# Rebuild the shipped models from nothing but ../shared/data/lumbar-mr (docs/validation.md says what
# each stage measured). Fifteen stages, each one `lumbarseg-train` command (or a script around one):
#   0. uvd-starter@1: the starter recipe on the 8 cases of the first release (from scratch)
#   1. uvd-starter@2 (the default): stage 0 fine-tuned on the 53 training cases of the fixed split
#      (scripts/recipes/lumbar-mr-split.json) with the generalisation recipe
#   2. uvd-partner@1 (its ensemble partner): the same fine-tune with the earlier recipe (strong
#      intensity augmentation, structure-balanced sampling): different errors, so the pair averages well
#   3. uvd-nowf: from scratch on the 14 training cases of the sources other than water-fat (the
#      annotation loop's start model; docs/annotation_loop.md)
#   4. uvd-starter@3 (the second round's default): stage 3 fine-tuned on the 53 training
#      cases, strong intensity augmentation, source-balanced sampling, 20 epochs; its last epoch is
#      exported (`lumbarseg-train export .../last.pt`, which keeps the run's provenance)
#   5. uvd-nowf-domain: stage 3 with `domain` intensity augmentation (the leave-water-fat-out
#      measurement of docs/validation.md: 0.82 on the unseen source where stage 3 scores 0.10)
#   6. uvd-partner@2 (the ensemble partner since the third round): stage 5 fine-tuned like stage 4
#      but with `domain` augmentation; last epoch
#   7. uvd-starter@4 (the default since the third round): stage 4 fine-tuned 10 more epochs at
#      lr 1e-4 with `domain` augmentation, so the default keeps @3's accuracy on the four known
#      sources (-0.005) and gains the robustness to unseen contrasts that `domain` buys. The gate's
#      held-out cases are all from known sources and cannot see that, so it is published with
#      --force; the record keeps what the gate said.
#   8. uvd-fit@1 (the eleventh round's fit, shipped as an option and as @5's published parent): stage 7
#      fine-tuned 1920 steps at lr 3e-4 with only half the patches augmented (--augment-share 0.5,
#      domain), the other half plain crops of the real images; fits the known sources best
#   9. uvd-starter@5 (the default since the eleventh round): stage 8 and 480 more steps at lr 1e-4 with
#      every patch augmented (domain), which gives back the robustness to a never-seen contrast
#      (docs/validation.md, eleventh round: both tables)
#  10. uvd-spine (the spine6 schema: body, disc, posterior elements, spinal canal, sacrum): stage 9
#      fine-tuned into spine6 on every source of ../shared/data (lumbar-mr, spider-t2space, t1-levels;
#      scripts/train_spine6.sh, the split of the new sources in scripts/recipes/new-sources-split.json).
#      Published as an option: it labels the canal and whole vertebrae; no sacrum yet (docs/lab/spine6-sources.md).
#  11. uvd-starter@6 (the default): stages 10 and 9 interpolated halfway (scripts/interpolate_weights.py)
#  12. uvd-guide@1: the click-guided model (click maps and the current labels as inputs), from stage 9
#  13. uvd-spine@2 (the default): stage 10 fine-tuned on every source again, the sacrum's pixels weighted
#      8x in the cross-entropy (--class-weight sacrum=8): the first model that draws the sacrum
#  14. uvd-spine-lite@1 (an option): stage 13 slimmed to a quarter of its arithmetic and distilled from it
#  15. uvd-spine@3 (the default): stage 13 fine-tuned again with stage 14 as its teacher where labels say
#      nothing: the light model's posterior elements, canal and sacrum taught back to the full-width network
#  16. a second light student (not published): stage 15 slimmed and distilled like stage 14, 7000 steps
#  17. uvd-spine@4 (the default): stage 15 fine-tuned again, stage 16 teaching the posterior elements, canal
#      and sacrum and stage 15 itself the rest, where labels say nothing
#  18. uvd-spine-lite@2 (an option): stage 16 taught by stage 17 on every pixel (--distill-everywhere), 4000
#      steps at lr 3e-4 and 2500 at lr 1e-4: within 0.003 of stage 17 on every source of the validation split
# then publishes 1, 2, 4, 6, 7, 8, 9 into a registry (default: a scratch one; pass Resources/Models to replace
# the shipped ones). CPU-time budgets make a run stop at the same point on a busy or a quiet machine;
# on a GPU add --device cuda and drop --threads. Not bit-identical to the shipped weights: those were
# trained in stages with the same settings (the run folders' progress.jsonl record each stage).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
DATA="${DATA:-../shared/data/lumbar-mr}"
OUT="${OUT:-runs/rebuild}"
REGISTRY="${1:-$OUT/registry}"
SPLIT=scripts/recipes/lumbar-mr-split.json
ids() { python - "$DATA" "$SPLIT" "$1" <<'PY'
import json, sys
from pathlib import Path
data, split, which = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text()), sys.argv[3]
every = sorted(p.stem for p in data.glob("*.json"))
held = set(split["test"])
print(",".join(split["val"] if which == "val" else [c for c in every if c not in held]))
PY
}
TRAINVAL="$(ids trainval)"
VAL="$(ids val)"

# stage 0: the starter (8 training + 4 validation cases of the first release; VB2_06 never used)
lumbarseg-train train --data "$DATA" --cases IVD_11,IVD_20,VB1_07,VB2_02,VB2_04,VB3_01,VB3_02,VB3_03,IVD_25,VB1_08,VB2_05,VB3_04 \
  --val-cases IVD_25,VB1_08,VB2_05,VB3_04 --variant UVD --init-filters 16 --lr 1e-3 --epochs 30 --batch-size 8 \
  --patch 192 --precision bf16 --threads 1 --val-every 2 --val-stride 3 --patience 8 --intensity-aug strong \
  --unannotated-bg-weight 0.05 --max-minutes 36 --budget-clock cpu --name uvd-starter --out "$OUT/uvd-starter"

# --plain-finetune: these stages were trained before a fine-tune kept its parent by default (replay, blend);
# every case of every source is in their data anyway
FT="--plain-finetune --data $DATA --cases $TRAINVAL --val-cases $VAL --patch 192 --batch-size 8 --steps-per-epoch 60 --epochs 36 \
  --lr 3e-4 --unannotated-bg-weight 0.05 --precision bf16 --threads 1 --val-every 4 --val-stride 4 --patience 0 \
  --max-minutes 45 --budget-clock cpu"
# stage 1: the default
lumbarseg-train finetune --from "$OUT/uvd-starter/package" $FT --intensity-aug domain --resolution-aug 0.3 \
  --slab-aug 0.25 --balance sources --name uvd-starter --out "$OUT/uvd-domain"
# stage 2: its ensemble partner
lumbarseg-train finetune --from "$OUT/uvd-starter/package" $FT --intensity-aug strong --name uvd-partner \
  --out "$OUT/uvd-partner"

# stage 3: the start model without water-fat
lumbarseg-train train --data "$DATA" \
  --cases IVD_11,IVD_20,VB1_07,VB1_11,VB1_15,VB1_17,VB2_02,VB2_04,VB2_07,VB2_08,VB2_09,VB2_10,VB2_18,VB2_20,VB1_10,VB2_05,VB2_17 \
  --val-cases VB1_10,VB2_05,VB2_17 --variant UVD --init-filters 16 --lr 1e-3 --epochs 30 --batch-size 8 --patch 192 \
  --precision bf16 --threads 1 --val-every 2 --val-stride 3 --patience 8 --intensity-aug strong \
  --unannotated-bg-weight 0.05 --max-minutes 32 --budget-clock cpu --name uvd-nowf --out "$OUT/uvd-nowf"
# stage 4: the default, its last epoch exported
lumbarseg-train finetune --from "$OUT/uvd-nowf/package" $FT --epochs 20 --max-minutes 40 --intensity-aug strong \
  --balance sources --name uvd-nowf-all --out "$OUT/nowf-all"
lumbarseg-train export "$OUT/nowf-all/last.pt" --out "$OUT/nowf-all-e20" --name uvd-starter

# stage 5: stage 3 with domain augmentation (fixed 16 epochs of 98 steps)
lumbarseg-train train --data "$DATA" \
  --cases IVD_11,IVD_20,VB1_07,VB1_11,VB1_15,VB1_17,VB2_02,VB2_04,VB2_07,VB2_08,VB2_09,VB2_10,VB2_18,VB2_20,VB1_10,VB2_05,VB2_17 \
  --val-cases VB1_10,VB2_05,VB2_17 --variant UVD --init-filters 16 --lr 1e-3 --epochs 16 --batch-size 8 --patch 192 \
  --precision bf16 --threads 1 --val-every 4 --val-stride 3 --patience 0 --intensity-aug domain \
  --unannotated-bg-weight 0.05 --name uvd-nowf-domain --out "$OUT/uvd-nowf-domain"
# stage 6: the partner, its last epoch exported
lumbarseg-train finetune --from "$OUT/uvd-nowf-domain/package" $FT --epochs 20 --max-minutes 40 --intensity-aug domain \
  --balance sources --name uvd-nowfdom-all --out "$OUT/nowfdom-all"
lumbarseg-train export "$OUT/nowfdom-all/last.pt" --out "$OUT/nowfdom-all-e20" --name uvd-partner
# stage 7: the default: stage 4's model, 10 more epochs with domain augmentation at lr 1e-4
lumbarseg-train finetune --from "$OUT/nowf-all-e20" $FT --epochs 10 --lr 1e-4 --val-every 10 --max-minutes 30 \
  --intensity-aug domain --balance sources --name uvd-starter --out "$OUT/v3-domain"
# stage 8: half the patches plain (no --max-minutes: a fixed number of steps, 32 x 60)
FT11="--plain-finetune --data $DATA --cases $TRAINVAL --val-cases $VAL --patch 192 --batch-size 8 --steps-per-epoch 60 \
  --unannotated-bg-weight 0.05 --precision bf16 --threads 1 --val-stride 4 --patience 0 --balance sources"
lumbarseg-train finetune --from "$OUT/v3-domain/package" $FT11 --lr 3e-4 --epochs 32 --val-every 32 \
  --intensity-aug domain --augment-share 0.5 --name uvd-fit --out "$OUT/v5-fit"
# stage 9: the tail, every patch augmented
lumbarseg-train finetune --from "$OUT/v5-fit/package" $FT11 --lr 1e-4 --epochs 8 --val-every 8 \
  --intensity-aug domain --name uvd-starter --out "$OUT/v5-tail"

lumbarseg-train publish "$OUT/uvd-starter/package" --registry "$REGISTRY" --force
lumbarseg-train publish "$OUT/uvd-domain/package" --registry "$REGISTRY" --force
lumbarseg-train publish "$OUT/uvd-partner/package" --registry "$REGISTRY" --no-default --ensemble uvd-starter@2,@new
lumbarseg-train publish "$OUT/nowf-all-e20" --registry "$REGISTRY" --name uvd-starter --data "$DATA" --cases "$VAL" --metric level_range_dice \
  --ensemble uvd-starter@3,uvd-partner@1
lumbarseg-train publish "$OUT/nowfdom-all-e20" --registry "$REGISTRY" --name uvd-partner --no-default
lumbarseg-train publish "$OUT/v3-domain/package" --registry "$REGISTRY" --name uvd-starter --data "$DATA" --cases "$VAL" \
  --metric level_range_dice --force --ensemble uvd-starter@4,uvd-partner@2
lumbarseg-train publish "$OUT/v5-fit/package" --registry "$REGISTRY" --name uvd-fit --no-default
lumbarseg-train publish "$OUT/v5-tail/package" --registry "$REGISTRY" --name uvd-starter --data "$DATA" --cases "$VAL" \
  --metric level_range_dice --ensemble uvd-starter@5,uvd-fit@1
# stage 10: uvd-spine@1: the spine6 fine-tune on every source. The shipped run: --resolution-aug 0.3, a 75-minute
# wall budget that shortened the 360-epoch schedule to 171 epochs of 10 steps on a CPU shared with stage 12
SHARED="$(dirname "$DATA")"
MINUTES=75 SHARED="$SHARED" scripts/train_spine6.sh "$OUT/spine6" "$OUT/v5-tail/package" --resolution-aug 0.3
lumbarseg-train publish "$OUT/spine6/package" --registry "$REGISTRY" --name uvd-spine --no-default
# stage 11: uvd-starter@6 (the default): stage 10 and stage 9 halfway on one line, in the starter schema, through
# the gate on the new sources' validation cases (SPIDER, and the first 20 T1 slices) and the reference set
python scripts/interpolate_weights.py "$OUT/spine6/package" "$OUT/v5-tail/package" 0.5 "$OUT/wise-starter-0.5" \
  --schema starter --name uvd-starter
NEWVAL=$(python -c "import json; d=json.load(open('scripts/recipes/new-sources-split.json'))['sources']; \
print(','.join(d['spider-t2space']['val'] + d['t1-levels']['val'][:20]))")
lumbarseg-train publish "$OUT/wise-starter-0.5" --registry "$REGISTRY" --name uvd-starter \
  --data "$SHARED/spider-t2space,$SHARED/t1-levels" --cases "$NEWVAL" --metric level_range_dice
# stage 12: uvd-guide@1, the click-guided model (experimental; docs/refine.md): 2400 steps from stage 9, one thread
THREADS=1 MINUTES=70 STEPS=2400 SHARED="$SHARED" scripts/train_guidance.sh "$OUT/guide" "$OUT/v5-tail/package"
lumbarseg-train publish "$OUT/guide/package" --registry "$REGISTRY" --name uvd-guide --no-default
# stage 13: uvd-spine@2 (the default): stage 10, 2660 more steps at lr 1.5e-4 with the sacrum weighted, through the
# gate on the new sources' validation cases and the reference set. The shipped run: a 200-minute CPU-time budget
# that shortened the 360-epoch schedule to 266 epochs of 10 steps at epoch 54 (the CPU was shared);
# --epochs 266 gives that length without the budget.
MINUTES=0 SHARED="$SHARED" scripts/train_spine6.sh "$OUT/spine7" "$OUT/spine6/package" --lr 1.5e-4 \
  --class-weight sacrum=8 --max-minutes 200 --budget-clock cpu
lumbarseg-train publish "$OUT/spine7/package" --registry "$REGISTRY" --name uvd-spine \
  --data "$SHARED/spider-t2space,$SHARED/t1-levels" --cases "$NEWVAL" --metric level_range_dice
# stage 14: uvd-spine-lite@1 (an option for CPUs without bf16: a quarter of the network's arithmetic): stage 13
# copied into a network of first-level width 8 (its channels of largest BatchNorm scale, models/slim.py) and
# trained on every source with stage 13 as its teacher (--distill 1). The shipped run: a 100-minute wall budget
# that shortened the schedule to 595 epochs of 10 steps; --epochs 595 gives that length without the budget.
MINUTES=0 SHARED="$SHARED" scripts/train_spine6.sh "$OUT/slim8" "$OUT/spine7/package" --slim 8 --distill 1 \
  --lr 1e-3 --epochs 595 --class-weight sacrum=8 --name uvd-spine-lite
lumbarseg-train publish "$OUT/slim8/package" --registry "$REGISTRY" --name uvd-spine-lite --no-default \
  --data "$SHARED/spider-t2space,$SHARED/t1-levels" --cases "$NEWVAL" --metric level_range_dice
# stage 15: uvd-spine@3 (the default): stage 13, 2400 more steps at lr 3e-4, distilled from stage 14 where the
# labels say nothing (--teacher, --distill 1): the light model draws the posterior elements, the canal and the
# sacrum better than its wide parent, and teaches them back; the labels keep the bodies and discs. Through the
# gate on the new sources' validation cases and the reference set.
MINUTES=0 SHARED="$SHARED" scripts/train_spine6.sh "$OUT/spine14" "$OUT/spine7/package" \
  --teacher "$OUT/slim8/package" --distill 1 --lr 3e-4 --epochs 240 --class-weight sacrum=8
lumbarseg-train publish "$OUT/spine14/package" --registry "$REGISTRY" --name uvd-spine \
  --data "$SHARED/spider-t2space,$SHARED/t1-levels" --cases "$NEWVAL" --metric level_range_dice
# stage 16: a second student (not published, the teacher of stage 17): stage 15 slimmed to width 8 and distilled
# from it, 7000 steps at lr 1e-3.
MINUTES=0 SHARED="$SHARED" scripts/train_spine6.sh "$OUT/slim8v2" "$OUT/spine14/package" --slim 8 --distill 1 \
  --lr 1e-3 --epochs 700 --class-weight sacrum=8 --name uvd-spine-lite
# stage 17: uvd-spine@4 (the default): stage 15, 2400 more steps at lr 3e-4, distilled where the labels say nothing
# from two teachers: stage 16 for the posterior elements, spinal canal and sacrum, which it draws better, and
# stage 15 itself for background, bodies and discs (--teacher-classes). Through the gate as before.
MINUTES=0 SHARED="$SHARED" scripts/train_spine6.sh "$OUT/spine17" "$OUT/spine14/package" \
  --teacher "$OUT/slim8v2/package" --teacher-classes posterior_elements,spinal_canal,sacrum --distill 1 \
  --lr 3e-4 --epochs 240 --class-weight sacrum=8
lumbarseg-train publish "$OUT/spine17/package" --registry "$REGISTRY" --name uvd-spine \
  --data "$SHARED/spider-t2space,$SHARED/t1-levels" --cases "$NEWVAL" --metric level_range_dice
# stage 18: uvd-spine-lite@2 (an option): the second student (stage 16) copies the default (stage 17) on every
# pixel, labelled ones too (--distill-everywhere), in two runs: 400 epochs at lr 3e-4, then 250 at lr 1e-4.
MINUTES=0 SHARED="$SHARED" scripts/train_spine6.sh "$OUT/lite2" "$OUT/slim8v2/package" \
  --teacher "$OUT/spine17/package" --distill 1 --distill-everywhere --lr 3e-4 --epochs 400 --class-weight sacrum=8 \
  --name uvd-spine-lite
MINUTES=0 SHARED="$SHARED" scripts/train_spine6.sh "$OUT/lite3" "$OUT/lite2/package" \
  --teacher "$OUT/spine17/package" --distill 1 --distill-everywhere --lr 1e-4 --epochs 250 --warmup-steps 10 \
  --class-weight sacrum=8 --name uvd-spine-lite
lumbarseg-train publish "$OUT/lite3/package" --registry "$REGISTRY" --name uvd-spine-lite --no-default \
  --data "$SHARED/spider-t2space,$SHARED/t1-levels" --cases "$NEWVAL" --metric level_range_dice
