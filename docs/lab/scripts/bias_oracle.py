"""Upper bound of a click that recalibrates a whole class: the labelled class's log-odds margin shifted by one
bias for the whole case (-3..+3), and every drafted voxel dilated or eroded by one in-plane voxel, on the
untouched test split (level-range Dice). ``python docs/lab/scripts/bias_oracle.py [MODEL]``."""
import json, sys
from pathlib import Path
import numpy as np
ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
from LumbarSegmentLib.inference.engine import SegmentOptions
from LumbarSegmentLib.inference.engine_slices import SliceProbabilities
from LumbarSegmentLib.registry.catalog import resolve_model
from LumbarSegmentLib.training.clicks import level_dice
from LumbarSegmentLib.training.data import select_cases
from LumbarSegmentLib.training.evaluate import prepare_cases
from LumbarSegmentLib.core.geometry import sagittal_layout
from scipy import ndimage as ndi
pkg = resolve_model(sys.argv[1] if len(sys.argv) > 1 else None)
ids = json.loads((ROOT / "scripts/recipes/lumbar-mr-split-v2.json").read_text())["test"]
opt = SegmentOptions(device="cpu", threads=2)
for case in select_cases(ROOT.parent / "shared" / "data" / "lumbar-mr", ids):
    (ec,) = prepare_cases([case], pkg.schema, slab_mm=None)
    structure = next(s for s in ec.structures if s != "background")
    value, ch = pkg.schema[structure].value, pkg.schema.channel_of()[structure]
    sp = SliceProbabilities(ec.image, pkg, opt)
    P = sp.get(range(sp.n_slices))  # [S,K,H,W] canonical
    lay = sagittal_layout(ec.image)
    logp = np.log(np.clip(P, 1e-6, 1))
    other = np.max(np.delete(logp, ch, axis=1), axis=1)
    margin = logp[:, ch] - other
    res = {}
    for b in (-3, -2, -1, -0.5, 0, 0.5, 1, 2, 3):
        m = margin + b > 0
        lab = np.ascontiguousarray(lay.from_canonical(m.astype(np.uint8) * value))
        res[b] = level_dice(lab, ec.truth, ec.image, value, ch)
    m0 = margin > 0
    for name, op in (("dil1", lambda m: ndi.binary_dilation(m, np.ones((1, 3, 3)))), ("ero1", lambda m: ndi.binary_erosion(m, np.ones((1, 3, 3))))):
        lab = np.ascontiguousarray(lay.from_canonical(op(m0).astype(np.uint8) * value))
        res[name] = level_dice(lab, ec.truth, ec.image, value, ch)
    print(case.case_id, structure[:4], " ".join(f"{k}:{v:.3f}" for k, v in res.items()), flush=True)
