"""Click-guided correction of a label map, on the CPU, without retraining.

A click names a point (LPS millimetres), a structure (a class id of the model's schema) and a
sign: **positive** "this is <structure>", **negative** "this is not". The rules, all on the
canonical sagittal stack ``[s, r, c]`` (see ``geometry``) and within a reach around the click
(an ellipsoid of ``reach`` times the structure's typical size in the current labels), live in
:mod:`refine_regions`; docs/refine.md describes them for users:

* positive, the structure cut short in the clicked slice: its border moved out towards the click
  by about twice the click's distance from it, near the click, carried across slices;
* positive, the structure missing in the clicked slice but present in a neighbouring one: its last
  cross-section carried over the missing slices;
* positive, nothing of it near: what the model half saw or what looks like the clicked spot;
* negative: the side slices from a central click on, or the band between the click and the border.

The model's probabilities come from the engine (:class:`engine_slices.SliceProbabilities`), only
for the slices a click reaches, and stay cached in a :class:`RefineSession` between clicks.

Edits never touch voxels whose value is not one of the model's classes (hand-painted other
structures) or voxels the caller protects. Clicks are applied in order on the current labels; a
click on a spot that already has the asked-for answer does nothing, so a caller may pass either
the draft or the last result together with all clicks so far.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from LumbarSegmentLib.inference.engine import LoadedModel, SegmentOptions
from LumbarSegmentLib.inference.engine_slices import SliceProbabilities
from LumbarSegmentLib.core.geometry import sagittal_layout
from LumbarSegmentLib.registry.package import ModelPackage
from LumbarSegmentLib.core.schema import LabelSchema
from LumbarSegmentLib.core.volume import Volume

class ClickError(ValueError):
    """A click that cannot be used: malformed, outside the image, or naming an unknown structure."""


@dataclass(frozen=True)
class Click:
    point_lps: tuple[float, float, float]
    structure: str
    positive: bool

    @classmethod
    def parse(cls, text: str) -> "Click":
        """``X,Y,Z,STRUCTURE,+`` (or ``-``) with X, Y, Z in LPS millimetres."""
        parts = [p.strip() for p in str(text).split(",")]
        if len(parts) != 5:
            raise ClickError(f"click {text!r}: expected X,Y,Z,STRUCTURE,+ or X,Y,Z,STRUCTURE,- "
                             f"(LPS millimetres, a class id such as vertebral_body, and a sign)")
        try:
            xyz = tuple(float(v) for v in parts[:3])
        except ValueError:
            raise ClickError(f"click {text!r}: X, Y and Z must be numbers (LPS millimetres)") from None
        if not all(math.isfinite(v) for v in xyz):
            raise ClickError(f"click {text!r}: X, Y and Z must be finite numbers")
        if parts[4] not in ("+", "-"):
            raise ClickError(f"click {text!r}: the sign must be + (this is the structure) or - (it is not)")
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", parts[3]):
            raise ClickError(f"click {text!r}: STRUCTURE must be a class id such as vertebral_body")
        return cls(xyz, parts[3], parts[4] == "+")

    def __str__(self) -> str:
        x, y, z = self.point_lps
        return f"{x:g},{y:g},{z:g},{self.structure},{'+' if self.positive else '-'}"


@dataclass
class RefineParams:
    reach: float = 0.75  # half-axes of the reach ellipsoid, as a fraction of the typical extent
    prob_low: float = 0.25  # probability that ties a voxel to a missed structure
    prob_margin: float = 0.1  # border mode: how far below (above) the clicked spot's probability to reach
    near_mm: float = 4.0  # border mode when the click is this close to the structure's border
    block_other: float = 0.5  # another structure this likely stops an intensity-only region
    min_radius_mm: float = 2.0  # a click always edits at least this ball (clipped to its region)
    local_mm: float = 10.0  # border mode: the edit stays within this in-plane distance of the click
    centre_fraction: float = 0.6  # negative click this deep in its cross-section: the whole section is wrong


@dataclass
class ClickReport:
    click: str
    voxel: tuple[int, int, int]
    changed: int
    skipped: str = ""


@dataclass
class RefineResult:
    labels: np.ndarray  # stored [k, j, i] order, dtype and values of the current labels
    changed_voxels: int
    clicks: list[ClickReport] = field(default_factory=list)


def click_voxel(volume: Volume, click: Click) -> tuple[int, int, int]:
    """The stored ``[k, j, i]`` index nearest to ``click``; :class:`ClickError` outside the image."""
    ijk = np.linalg.solve(volume.ijk_to_lps(), np.array([*click.point_lps, 1.0]))[:3]
    idx = np.round(ijk).astype(int)
    size = np.array(volume.size_ijk)
    if np.any(idx < 0) or np.any(idx >= size):
        lo = volume.ijk_to_lps() @ np.array([0, 0, 0, 1.0])
        hi = volume.ijk_to_lps() @ np.array([*(size - 1), 1.0])
        span = ", ".join(f"{min(a, b):g} to {max(a, b):g}" for a, b in zip(lo[:3], hi[:3]))
        raise ClickError(f"click {click}: the point lies outside the image (voxel index {tuple(int(v) for v in idx)}"
                         f" of {tuple(int(v) for v in size)}); the image spans LPS x, y, z = {span} mm: "
                         f"give a point inside it")
    return int(idx[2]), int(idx[1]), int(idx[0])


def check_clicks(volume: Volume, clicks: Sequence[Click], schema: LabelSchema) -> list[tuple[int, int, int]]:
    """Stored indices of ``clicks``; one :class:`ClickError` for the first bad one."""
    fg = [c.id for c in schema.foreground]
    for click in clicks:
        if click.structure not in fg:
            raise ClickError(f"click {click}: unknown structure {click.structure!r}; the model labels "
                             f"{', '.join(fg)}")
    return [click_voxel(volume, c) for c in clicks]


class RefineSession:
    """One volume and one model kept warm: probabilities are computed once per slice, then reused."""

    def __init__(self, volume: Volume, model: ModelPackage | LoadedModel, options: SegmentOptions | None = None,
                 params: RefineParams | None = None, guided=None):
        """``params``: the training-free rules' settings; ``guided`` (``guided.GuidedParams``): a click-guided
        model's (window, edit radius, reach)."""
        from LumbarSegmentLib.inference.runners import check_models

        self.volume = volume
        options = options or SegmentOptions()
        (loaded,), self.schema = check_models([model], options)
        self.guided = None
        if loaded.guidance is not None:  # a click-guided model: the network redraws around each click
            from LumbarSegmentLib.inference.guided import GuidedRefiner

            self.guided = GuidedRefiner(volume, loaded, options, guided)
            self.probs = None
        else:
            self.probs = SliceProbabilities(volume, loaded, options)
        self.layout = sagittal_layout(volume, allow_reslice=options.allow_reslice)
        self.image = np.ascontiguousarray(self.layout.to_canonical(volume.array), dtype=np.float32)
        self.spacing = tuple(float(s) for s in self.layout.spacing_src)
        self.params = params or RefineParams()

    @property
    def method(self) -> str:
        """``guided`` (a click-guided model redraws around clicks) or ``rules`` (the training-free rules)."""
        return "guided" if self.guided is not None else "rules"

    def prefetch(self) -> None:
        """Compute every slice's probabilities now (a worker can do this while the draft is on screen),
        so that no later click waits for the model."""
        if self.probs is not None:
            self.probs.get(range(self.probs.n_slices))
        else:  # a guidance model: one window through the network, so the first click does not set it up
            self.guided.warm_up()

    def refine(self, current: np.ndarray, clicks: Sequence[Click], protect: np.ndarray | None = None,
               new: int | None = None) -> RefineResult:
        """Apply ``clicks`` in order to ``current`` (stored order, label values); see the module doc.

        ``new``: only the last ``new`` clicks edit ``current`` (an interactive tool passes every click
        of the case so far, so that a guidance model sees them all, and ``new=1``); None: all of them.
        """
        from LumbarSegmentLib.inference.refine_regions import ClickContext, apply_click

        current = np.asarray(current)
        if current.shape != self.volume.array.shape:
            raise ValueError(f"the labels' shape {current.shape} differs from the image's {self.volume.array.shape}")
        stored = check_clicks(self.volume, clicks, self.schema)
        work = np.array(self.layout.to_canonical(current))
        values = [c.value for c in self.schema.classes]
        editable = _is_one_of(work, values)
        if protect is not None:
            editable &= ~np.asarray(self.layout.to_canonical(np.asarray(protect, dtype=bool)))
        reports = []
        first = 0 if new is None else max(0, len(clicks) - int(new))
        voxels = [_canonical_index(self.layout, idx, current.shape) for idx in stored]
        if self.guided is not None:
            from LumbarSegmentLib.inference.guided import apply_guided

            done = apply_guided(self.guided, work, editable, self.schema, voxels, list(clicks), first)
            reports = [ClickReport(str(c), v, n, why) for c, v, (n, why) in zip(clicks[first:], voxels[first:], done)]
        else:
            ctx = ClickContext(self.image, work, editable, self.spacing, self.schema, self.params, self.probs)
            for click, voxel in list(zip(clicks, voxels))[first:]:
                changed, why = apply_click(ctx, voxel, click.structure, click.positive)
                reports.append(ClickReport(str(click), voxel, changed, why))
        out = np.ascontiguousarray(self.layout.from_canonical(work)).astype(current.dtype, copy=False)
        return RefineResult(out, int((out != current).sum()), reports)


def _is_one_of(array: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """``np.isin(array, values)``, by table look-up for small unsigned labels (a label map's usual type)."""
    if array.dtype.kind == "u" and array.dtype.itemsize <= 2:
        table = np.zeros(1 << (8 * array.dtype.itemsize), bool)
        table[[v for v in values if 0 <= v < table.size]] = True
        return table[array]
    return np.isin(array, values)


def _canonical_index(layout, stored_idx: tuple[int, int, int], shape) -> tuple[int, int, int]:
    """A stored ``[k, j, i]`` index as a canonical ``[s, r, c]`` one."""
    out = []
    for canon_axis in range(3):
        a = layout.perm[canon_axis]
        v = stored_idx[a]
        out.append(shape[a] - 1 - v if layout.flip[canon_axis] else v)
    return tuple(int(v) for v in out)


def refine_labels(volume: Volume, current: np.ndarray, clicks: Sequence[Click], model: ModelPackage | LoadedModel,
                  options: SegmentOptions | None = None, protect: np.ndarray | None = None) -> RefineResult:
    """One-shot form of :meth:`RefineSession.refine` (the command line's)."""
    return RefineSession(volume, model, options).refine(current, clicks, protect)


def refine_file(image_path, labels_path, output_path, click_texts: Sequence[str], *, model: str | None = None,
                threads: int | None = None) -> dict:
    """Read, check, refine, write atomically (the command line's body); returns a small report.

    Every check comes before the model is loaded and before anything is written: a bad click,
    labels on another grid or an output that is an input raise and leave nothing behind.
    """
    from pathlib import Path

    from LumbarSegmentLib.formats.io import read_volume, volume_suffix, write_volume
    from LumbarSegmentLib.registry.catalog import resolve_refine_model

    out = Path(output_path)
    if not volume_suffix(out):
        raise ValueError(f"output {out}: use a .nii.gz, .nrrd or .mha file name")
    if not out.parent.is_dir():
        raise ValueError(f"output folder {out.parent} does not exist; create it first")
    if out.resolve() in (Path(image_path).resolve(), Path(labels_path).resolve()):
        raise ValueError(f"output {out} is one of the inputs; write the result to another file")
    clicks = [Click.parse(t) for t in click_texts]
    image = read_volume(image_path)
    labels = read_volume(labels_path)
    if not image.same_geometry(labels):
        raise ValueError(f"{labels_path} is not on the image's grid ({labels.describe_geometry()} vs "
                         f"{image.describe_geometry()}); resample the labels onto the image first")
    pkg = resolve_refine_model(model)
    check_clicks(image, clicks, pkg.schema)  # before the model runs
    session = RefineSession(image, pkg, SegmentOptions(threads=threads))
    result = session.refine(labels.array, clicks)
    write_volume(labels.with_array(result.labels), out)
    return {"changed_voxels": result.changed_voxels, "clicks": [c.__dict__ for c in result.clicks],
            "model": pkg.ref, "method": session.method}
