"""A PNG a person can glance at: a few central sagittal slices with the label overlay."""
from __future__ import annotations

import numpy as np

from LumbarSegmentLib.core.geometry import sagittal_layout
from LumbarSegmentLib.core.schema import LabelSchema
from LumbarSegmentLib.core.volume import Volume


def _window(img: np.ndarray) -> np.ndarray:
    finite = img[np.isfinite(img)]
    lo, hi = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
    hi = hi if hi > lo else lo + 1
    return (np.clip((np.nan_to_num(img) - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def render_preview(image: Volume, labels: Volume, schema: LabelSchema, path, *, n_slices: int = 3,
                   alpha: float = 0.45, allow_reslice: bool = False, title: str | None = None):
    """Write a PNG of ``n_slices`` central sagittal slices: image left, overlay right, per slice.

    Slices are shown in the canonical orientation (head up, anterior left) at their
    physical aspect ratio, with a legend of the classes present.
    """
    from PIL import Image, ImageDraw

    from LumbarSegmentLib.core.files import atomic_path

    layout = sagittal_layout(image, allow_reslice=allow_reslice)
    img = layout.to_canonical(image.array.astype(np.float32))
    lab = layout.to_canonical(labels.array)
    S = img.shape[0]
    fg_per_slice = (lab != 0).reshape(S, -1).sum(1)
    # Centre on the slice with most foreground, unless "foreground" fills whole slices (a bad model).
    plane_px = lab[0].size
    centre = int(np.argmax(fg_per_slice)) if 0 < fg_per_slice.max() < 0.5 * plane_px else S // 2
    idx = sorted({int(np.clip(centre + d, 0, S - 1)) for d in np.linspace(-(n_slices // 2) * 3, (n_slices // 2) * 3,
                                                                           n_slices).astype(int)})
    lut = np.zeros((256, 3), dtype=np.uint8)
    for c in schema.classes:
        lut[c.value] = c.color
    row_sp, col_sp = layout.inplane_spacing
    tiles = []
    for s in idx:
        gray = _window(img[s])
        rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
        m = lab[s] != 0
        over = rgb.copy()
        over[m] = (1 - alpha) * rgb[m] + alpha * lut[lab[s][m]]
        pair = np.concatenate([rgb, over], axis=1).astype(np.uint8)
        h, w = gray.shape
        scale = 512.0 / max(h * row_sp, w * col_sp)
        size = (max(1, int(round(2 * w * col_sp * scale))), max(1, int(round(h * row_sp * scale))))
        tiles.append((s, Image.fromarray(pair).resize(size, Image.NEAREST)))
    pad, header = 8, 22
    width = max(t.width for _, t in tiles) + 2 * pad
    height = sum(t.height + header for _, t in tiles) + pad + header * bool(title) + 22 * (len(schema.foreground) + 1)
    canvas = Image.new("RGB", (width, height), (20, 20, 20))
    draw = ImageDraw.Draw(canvas)
    y = pad
    if title:
        draw.text((pad, y), title, fill=(255, 255, 255))
        y += header
    for s, tile in tiles:
        draw.text((pad, y + 4), f"sagittal slice {s + 1}/{S}  (left: image, right: labels; head up, anterior left)",
                  fill=(220, 220, 220))
        y += header
        canvas.paste(tile, (pad, y))
        y += tile.height
    present = set(np.unique(labels.array).tolist())
    for c in schema.foreground:
        y += 4
        draw.rectangle([pad, y, pad + 14, y + 14], fill=tuple(c.color))
        n = int((labels.array == c.value).sum())
        # ASCII only: PIL's built-in bitmap font has no glyph for a dash and would draw a box
        draw.text((pad + 22, y + 2), f"{c.name} ({c.id}): {n} voxels" + ("" if c.value in present else ", not found"),
                  fill=(230, 230, 230))
        y += 18
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path
