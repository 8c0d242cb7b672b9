"""What ``lumbarseg segment --levels / --measurements`` adds to a segmented case.

* ``--levels``: the label map (and ``--seg-nrrd``, ``--preview``, ``--dicom-seg``) holds one value
  per level (``level_names``), the report gains ``"levels"`` and ``"ordering"``;
* ``--measurements FILE.csv``: one row per level (``measurements.COLUMNS``); the levels are named
  for it even without ``--levels`` (then the label map keeps the model's classes);
* ``--measurements-png FILE.png``: the height lines over the spine's mid-sagittal slice.

Without these options nothing here runs: the draft is the engine's, bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from LumbarSegmentLib.spine.levels import name_levels
from LumbarSegmentLib.spine.measurements import measure_levels, to_csv
from LumbarSegmentLib.core.volume import Volume

@dataclass
class LevelRequest:
    levels: bool = False  # write the level label map
    measurements: bool = False
    png: bool = False

    @property
    def active(self) -> bool:
        return self.levels or self.measurements or self.png


def apply_levels(request: LevelRequest, result, image: Volume, report: dict, *, allow_reslice: bool):
    """``(result to write, extra writers)``: names levels, fills the report, prepares the tables."""
    if not request.active:
        return result, {}
    named = name_levels(result.labels, result.schema, allow_reslice=allow_reslice, image=image)
    report.update(named.to_report())
    report["label_values"] = "levels" if request.levels else "classes"  # what the label map's values mean
    out = replace(result, labels=named.labels, schema=named.schema) if request.levels else result
    writers = {}
    rows = measure_levels(named.labels, allow_reslice=True, with_lines=request.png) \
        if (request.measurements or request.png) else []
    if request.measurements:
        text = to_csv(rows)
        writers["measurements"] = lambda tmp: tmp.write_text(text)
    if request.png:
        writers["measurements_png"] = lambda tmp: render_measurements(image, named.labels, rows, tmp,
                                                                      allow_reslice=allow_reslice)
    return out, writers


def render_measurements(image: Volume, levels: Volume, rows: list[dict], path, *, allow_reslice: bool = False,
                        alpha: float = 0.35) -> None:
    """PNG: the slice holding most of the spine, level colours, each level's three height lines
    (measured on that level's own mid-sagittal slice) and its name."""
    from PIL import Image, ImageDraw

    from LumbarSegmentLib.core.geometry import sagittal_layout
    from LumbarSegmentLib.spine.level_names import level_color

    layout = sagittal_layout(image, allow_reslice=allow_reslice)
    img = layout.to_canonical(np.asarray(image.array, np.float32))
    lab = layout.to_canonical(np.asarray(levels.array))
    s = int(np.argmax((lab != 0).reshape(lab.shape[0], -1).sum(1)))
    finite = img[s][np.isfinite(img[s])]
    lo, hi = np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0)
    gray = (np.clip((img[s] - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.float32)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    for r in rows:
        m = lab[s] == r["label"]
        rgb[m] = (1 - alpha) * rgb[m] + alpha * np.array(level_color(r["level"]), np.float32)
    sr, sc = layout.inplane_spacing
    scale = 3.0 * max(1.0, 256.0 / max(lab.shape[1] * sr, lab.shape[2] * sc))
    size = (int(round(lab.shape[2] * sc * scale)), int(round(lab.shape[1] * sr * scale)))
    canvas = Image.fromarray(rgb.astype(np.uint8)).resize(size, Image.BILINEAR)
    draw = ImageDraw.Draw(canvas)
    for r in rows:
        for ln in r.get("lines", []):
            (r0, c0), (r1, c1) = ln.start, ln.end
            draw.line([(c0 * sc * scale, r0 * sr * scale), (c1 * sc * scale, r1 * sr * scale)],
                      fill=(255, 255, 0) if r["structure"] == "vertebral_body" else (0, 255, 255), width=2)
        if r.get("lines"):
            (r0, c0), _ = r["lines"][0].start, None
            draw.text((max(0.0, c0 * sc * scale - 46), r0 * sr * scale), r["level"], fill=(255, 255, 255))
    from LumbarSegmentLib.core.files import atomic_path

    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
