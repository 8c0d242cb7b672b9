"""What makes a whole T1 slice collapse: score single t1-levels slices under one change at a time.

    python scripts/t1_probe.py --models uvd-starter@5 --split val --limit 12

Each slice goes through the engine as a one-slice volume (as a user's 2D image would), scored on the
vertebral bodies inside its ``labels_complete_z_range`` (Dice per slice), as given and changed:

* ``pixel 1.6`` / ``pixel 2.0``: resampled to coarser pixels (area mean), the spacing set to match:
  the unseen source's 1.4-2 mm pixels;
* ``spacing x1.3``: the image untouched, its stated pixel size 30 % too large (an estimate off, or a
  header that lies): anatomy looks 30 % too large to the engine;
* ``fov 60%``: only the central 60 % of the field of view (a tight crop around the spine);
* ``dark bg``: every pixel below the 5th percentile set to exactly 0 (JPEG noise in the background
  removed: the engine's z-score counts only non-zero pixels);
* ``gamma 2`` / ``inverted``: other contrast.
The truth is resampled with each change (nearest). A change that collapses slices points at the cause.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from LumbarSegmentLib.registry.registry import Registry  # noqa: E402
from LumbarSegmentLib.registry.catalog import resolve_model  # noqa: E402
from LumbarSegmentLib.core.schema import load_schema  # noqa: E402
from LumbarSegmentLib.training.data import case_source, select_cases  # noqa: E402
from LumbarSegmentLib.training.evaluate import eval_options, predict  # noqa: E402
from LumbarSegmentLib.training.targets import IGNORE_INDEX, case_target  # noqa: E402

sys.path.insert(0, str(ROOT / "scripts"))
from score_sources import split_ids  # noqa: E402

SPINE = load_schema("spine6")
BODY = SPINE.channel_of()["vertebral_body"]


def _resize(a: np.ndarray, size, mode: str) -> np.ndarray:
    t = torch.from_numpy(a.astype(np.float32))[None, None]
    kw = {} if mode in ("nearest", "area") else {"align_corners": False}
    return torch.nn.functional.interpolate(t, size=size, mode=mode, **kw)[0, 0].numpy()


def variants(img: np.ndarray, codes: np.ndarray, spacing: tuple):
    """``(name, image [z,y], codes [z,y], spacing)`` for each change (2D planes: z rows, y columns)."""
    yield "as given", img, codes, spacing
    for mm in (1.6, 2.0):
        f = spacing[2] / mm
        size = (max(8, round(img.shape[0] * f)), max(8, round(img.shape[1] * f)))
        yield f"pixel {mm}", _resize(img, size, "area"), _resize(codes, size, "nearest").astype(np.uint8), \
            (spacing[0], mm, mm)
    yield "spacing x1.3", img, codes, (spacing[0], spacing[1] * 1.3, spacing[2] * 1.3)
    h, w = img.shape
    a0, a1, b0, b1 = int(h * 0.2), int(h * 0.8), int(w * 0.2), int(w * 0.8)
    yield "fov 60%", img[a0:a1, b0:b1], codes[a0:a1, b0:b1], spacing
    dark = img.copy()
    dark[dark < np.percentile(img, 5)] = 0
    yield "dark bg", dark, codes, spacing
    lo, hi = float(img.min()), float(img.max())
    yield "gamma 2", lo + (hi - lo) * ((img - lo) / max(hi - lo, 1e-6)) ** 2, codes, spacing
    yield "inverted", hi + lo - img, codes, spacing


def body_dice(pred_ch: np.ndarray, codes: np.ndarray) -> float:
    known = codes != IGNORE_INDEX
    t, q = (codes == BODY) & known, (pred_ch == BODY) & known
    return 2 * float((t & q).sum()) / max(1.0, float(t.sum() + q.sum()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", required=True)
    p.add_argument("--registry", default=str(ROOT / "Resources" / "Models"))
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "t1-levels"))
    p.add_argument("--split", default="val", choices=("test", "val", "train"))
    p.add_argument("--limit", type=int, default=12)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from LumbarSegmentLib.core.volume import Volume

    regs = [Registry(a.registry, read_only=True)]
    opts = eval_options(device="cpu", mode="fast")
    for ref in a.models.split(","):
        pkg = resolve_model(ref, regs)
        rows: dict[str, list[float]] = {}
        for case in select_cases(a.data, split_ids("t1-levels", a.split)[:a.limit or None]):
            image, label = case.load()
            codes, _ = case_target(case, label.array, SPINE, case_source(case))
            for name, img, cod, sp in variants(image.array[:, :, 0].astype(np.float32), codes[:, :, 0], image.spacing):
                vol = Volume(np.ascontiguousarray(img[:, :, None]), spacing=sp, origin=image.origin,
                             direction=image.direction)
                pred = SPINE.values_to_channels(predict([pkg], vol, opts))[:, :, 0]
                rows.setdefault(name, []).append(body_dice(pred, cod))
        print(f"\n{ref}: vertebral-body Dice per slice on {a.split} slices ({len(rows['as given'])}), "
              f"inside labels_complete_z_range")
        print("| change | mean | worst | slices < 0.80 |\n|---|---|---|---|")
        for name, v in rows.items():
            print(f"| {name} | {np.mean(v):.3f} | {np.min(v):.3f} | {sum(x < 0.8 for x in v)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
