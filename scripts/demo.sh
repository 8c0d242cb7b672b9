#!/usr/bin/env bash
# The main job on a fresh machine: set up, then segment the sample volume with the shipped default
# model, writing a label map, a Slicer .seg.nrrd, a PNG overlay and a run report into ./out/.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
. "$ROOT/scripts/setup_env.sh"
OUT="${1:-$ROOT/out}"
mkdir -p "$OUT"
SAMPLE="$ROOT/Resources/Sample/VB2_06_image.mha"
lumbarseg models
lumbarseg segment "$SAMPLE" -o "$OUT/VB2_06_seg.nii.gz" --seg-nrrd "$OUT/VB2_06.seg.nrrd" \
  --preview "$OUT/VB2_06_preview.png" --report "$OUT/VB2_06_report.json"
# The sample carries manual vertebral-body masks (discs are not annotated): compare with them.
python - "$OUT/VB2_06_seg.nii.gz" "$ROOT/Resources/Sample/VB2_06_label.mha" <<'PY'
import sys
import numpy as np
from LumbarSegmentLib.formats.io import read_volume
pred, ref = read_volume(sys.argv[1]).array == 1, read_volume(sys.argv[2]).array > 0
dice = 2 * (pred & ref).sum() / max(1, pred.sum() + ref.sum())
print(f"vertebral body Dice against the manual mask of this unseen case: {dice:.3f}")
PY
echo "outputs in $OUT (open VB2_06_preview.png; load VB2_06.seg.nrrd in 3D Slicer with the image)"
