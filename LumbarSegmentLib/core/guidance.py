"""Click maps: how a click-guided model is told where the annotator clicked.

A guidance model is a segmentation network with extra input channels, one per (structure, sign)
pair of its schema (``vertebral_body+``, ``vertebral_body-``, ...). A click is drawn into its channel
as a filled disk around the clicked point, on the model's own in-plane grid. The click is a ball in
the patient: the slice it was made in gets a disk of ``radius_mm``, a slice ``d`` millimetres away a
smaller one, ``radius_mm * sqrt(1 - (d / reach_mm)^2)``, and slices ``reach_mm`` or farther away get
nothing. So on a 1 mm stack a click steers a few neighbouring slices, on a 4 mm clinical stack only
its own, as an annotator expects. Training draws disks of random radii up to ``radius_mm`` so the
network knows the smaller cross-sections too.

A guidance model may also read the current label map (``prior``: one mask per listed structure,
between the image and the click maps), as RITM does: it then sees what the draft already says and
learns to move a border the click says is wrong, along the whole structure, instead of drawing the
structure anew. Such a model corrects; it does not draft (without a label map it has nothing to
read), and the engine refuses it for drafting.

The manifest of such a package declares this under ``input.guidance`` (see :class:`GuidanceSpec`);
``input.channels`` counts the image channels plus one per prior mask and per click map. With every map empty the network is
asked "no clicks": a guidance model fine-tuned from a drafting model with zero-initialised click
weights starts out as exactly that drafting model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

RADIUS_MM = 3.0
REACH_MM = 4.0


class GuidanceError(ValueError):
    """A manifest's guidance section that cannot be used."""


@dataclass(frozen=True)
class GuidanceSpec:
    maps: tuple[tuple[str, bool], ...]  # (class id, positive) per extra input channel, in channel order
    radius_mm: float = RADIUS_MM  # in-plane radius of a click's disk in the slice it was made in
    reach_mm: float = REACH_MM  # a click reaches slices closer than this (the ball's half-depth)
    prior: tuple[str, ...] = ()  # class ids whose current masks the model reads (before the click maps)

    @property
    def channels(self) -> int:
        """Input channels after the image: the prior masks, then the click maps."""
        return len(self.prior) + len(self.maps)

    def channel(self, structure: str, positive: bool) -> int:
        """The click map (counted from the first click map) of a click, or -1 when there is none."""
        try:
            return self.maps.index((structure, bool(positive)))
        except ValueError:
            return -1

    def to_dict(self) -> dict:
        out = {"maps": [f"{c}{'+' if p else '-'}" for c, p in self.maps], "radius_mm": self.radius_mm,
               "reach_mm": self.reach_mm}
        return {**out, "prior": list(self.prior)} if self.prior else out

    @classmethod
    def from_dict(cls, d, class_ids: Iterable[str] = (), where: str = "manifest") -> "GuidanceSpec":
        if not isinstance(d, dict) or not isinstance(d.get("maps"), list) or not d["maps"]:
            raise GuidanceError(f"{where}: input.guidance must be an object with a non-empty list 'maps'")
        ids = set(class_ids)
        maps = []
        for m in d["maps"]:
            if not isinstance(m, str) or len(m) < 2 or m[-1] not in "+-" or (ids and m[:-1] not in ids):
                raise GuidanceError(f"{where}: input.guidance.maps entry {m!r} is not <class id of the schema>+ or -")
            maps.append((m[:-1], m[-1] == "+"))
        if len(set(maps)) != len(maps):
            raise GuidanceError(f"{where}: input.guidance.maps lists a map twice")
        out = []
        for key, default in (("radius_mm", RADIUS_MM), ("reach_mm", REACH_MM)):
            v = d.get(key, default)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.5 <= float(v) <= 50:
                raise GuidanceError(f"{where}: input.guidance.{key} must be a number from 0.5 to 50 mm, got {v!r}")
            out.append(float(v))
        prior = d.get("prior", [])
        if not isinstance(prior, list) or len(set(map(str, prior))) != len(prior) or any(
                not isinstance(c, str) or (ids and c not in ids) or c == "background" for c in prior):
            raise GuidanceError(f"{where}: input.guidance.prior must list class ids of the schema (no background), "
                                f"each once, got {prior!r:.80}")
        return cls(tuple(maps), *out, tuple(prior))

    @classmethod
    def for_classes(cls, class_ids: Sequence[str], radius_mm: float = RADIUS_MM,
                    reach_mm: float = REACH_MM, prior: bool = False) -> "GuidanceSpec":
        """A positive and a negative map for each structure (background excluded), and with ``prior`` a
        mask of each structure from the current label map."""
        fg = [c for c in class_ids if c != "background"]
        return cls(tuple((c, s) for c in fg for s in (True, False)), float(radius_mm), float(reach_mm),
                   tuple(fg) if prior else ())


@dataclass(frozen=True)
class ModelClick:
    """A click on the model's grid: canonical slice index, row and column in model pixels (floats)."""
    slice_mm: float  # position along the slice axis, millimetres
    row: float
    col: float
    channel: int  # guidance channel (from 0), see :meth:`GuidanceSpec.channel`


def disk_radius_px(spec: GuidanceSpec, distance_mm: float, pixel_mm: float) -> float:
    """The radius (model pixels) of a click's disk in a slice ``distance_mm`` from it; 0: not reached."""
    d = abs(float(distance_mm))
    if d >= spec.reach_mm:
        return 0.0
    return spec.radius_mm * math.sqrt(1.0 - (d / spec.reach_mm) ** 2) / pixel_mm


def _stamp_disk(plane, row: float, col: float, radius_px: float, origin: tuple[int, int] = (0, 0)) -> None:
    """Set to 1 the pixels of ``plane [H, W]`` (a region of the model grid starting at ``origin``) within
    ``radius_px`` of (``row``, ``col``), in place; a disk is never smaller than its clicked pixel."""
    import torch

    r = max(float(radius_px), 0.75)
    h, w = plane.shape
    rr = torch.arange(h, dtype=torch.float32, device=plane.device)[:, None] + (origin[0] - row)
    cc = torch.arange(w, dtype=torch.float32, device=plane.device)[None, :] + (origin[1] - col)
    plane.copy_(torch.maximum(plane, (rr * rr + cc * cc <= r * r).to(plane.dtype)))


def draw_maps(spec: GuidanceSpec, shape: tuple[int, int], slice_mm: float, clicks: Sequence[ModelClick],
              pixel_mm: float, origin: tuple[int, int] = (0, 0)):
    """The ``[M, H, W]`` float32 click maps of one slice (at ``slice_mm``) of a region of the model grid
    starting at ``origin`` (row, col): each click reaching it drawn as a disk of ones."""
    import torch

    out = torch.zeros((len(spec.maps),) + tuple(shape), dtype=torch.float32)
    for c in clicks:
        r = disk_radius_px(spec, slice_mm - c.slice_mm, pixel_mm)
        if r > 0 and 0 <= c.channel < len(spec.maps):
            _stamp_disk(out[c.channel], c.row, c.col, r, origin)
    return out


def draw_batch_disks(maps, batch_index: int, channel: int, row: int, col: int, radius_px: float) -> None:
    """Draw one disk into ``maps [B, G, H, W]`` in place (training's simulated clicks)."""
    _stamp_disk(maps[batch_index, channel], row, col, radius_px)
