"""Click correction with a click-guided model: the network itself redraws the structures around a click.

A guidance model (``core.guidance``) reads the image and one map per (structure, sign) with the
annotator's clicks drawn in. After a click, the slices the click reaches (its ball, ``reach_mm``)
are predicted again in a window of ``crop_mm`` around it, with every click of the case so far drawn
in, and the label map is replaced there by the new prediction, but only:

* within ``edit_mm`` (in-plane) of the click, in the slices it reaches;
* where the clicked structure appears (a positive click) or disappears (a negative click): a click
  says "this is" or "this is not" that structure, so it only adds or only takes away; a voxel that
  stays another structure's is left alone, and the annotator's brush work on other structures is
  never touched;
* on voxels the caller did not protect, whose value is one of the model's classes.

The clicked spot itself (the voxel and its in-slice neighbours within ``FORCE_MM``) always takes the
click's answer (the structure for a positive click, background for a negative one), so a click the
network ignores still changes something and a repeated click is never stuck.

Predicting a window instead of whole slices keeps a click near 0.1-0.2 s of CPU: the network runs on
a few 128 x 128 windows. The result does not depend on whether the caller passes the draft or the
last result together with all clicks: each click's region is redrawn from the image and the clicks.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from LumbarSegmentLib.core.guidance import ModelClick, disk_radius_px, draw_maps
from LumbarSegmentLib.inference.devices import pick_device
from LumbarSegmentLib.inference.options import SegmentOptions
from LumbarSegmentLib.inference.preprocess import model_slices
from LumbarSegmentLib.inference.runners import LoadedModel, Runner


FORCE_MM = 1.0  # the clicked spot that always takes the click's answer (radius, in-slice)


@dataclass
class GuidedParams:
    crop_mm: float = 128.0  # side of the window the network sees around a click
    edit_mm: float = 30.0  # in-plane radius around the click within which labels may change
    reach_mm: float | None = None  # how far across slices a click reaches (None: the model's own, its manifest)


class GuidedRefiner:
    """One volume and one click-guided model, warm between clicks."""

    def __init__(self, volume, model: LoadedModel, options: SegmentOptions, params: GuidedParams | None = None):
        self.spec, self.options = model, options
        self.params = params or GuidedParams()
        self.guidance = model.guidance
        if self.params.reach_mm is not None:
            self.guidance = replace(self.guidance, reach_mm=float(self.params.reach_mm))
        self.prior_values = [model.schema[c].value for c in self.guidance.prior]
        self.stack, self.layout, _ = model_slices(volume, model.spacing, allow_reslice=options.allow_reslice,
                                                  normalisation=model.normalisation)
        self.warnings: list[str] = []
        self.runner = Runner(model, pick_device(options.device), options, self.warnings, self.stack, lambda: False)
        self.plane = tuple(self.layout.to_canonical(volume.array).shape[1:])
        self.mplane = tuple(int(n) for n in self.stack.shape[1:])
        self.spacing = tuple(float(s) for s in self.layout.spacing_src)
        self.pixel_mm = float(np.mean(model.spacing))
        side = int(round(self.params.crop_mm / self.pixel_mm))
        self.crop = max(32, -(-side // 32) * 32)

    def warm_up(self) -> None:
        """Run the network once on a window of the middle slice with no clicks (kernels chosen, memory
        allocated), so that the first real click costs what every later one does."""
        mid = ModelClick(0.0, self.mplane[0] / 2, self.mplane[1] / 2, -1)
        self.predict([int(self.stack.shape[0]) // 2], mid, [])

    def model_click(self, voxel: tuple[int, int, int], structure: str, positive: bool) -> ModelClick:
        """A canonical ``[s, r, c]`` voxel as a click on the model's grid."""
        s, r, c = voxel
        return ModelClick(s * self.spacing[0], (r + 0.5) * self.mplane[0] / self.plane[0] - 0.5,
                          (c + 0.5) * self.mplane[1] / self.plane[1] - 0.5,
                          self.guidance.channel(structure, positive))

    def reached_slices(self, s: int) -> list[int]:
        """Canonical slices a click in slice ``s`` reaches (always ``s`` itself)."""
        n = int(self.stack.shape[0])
        k = int(np.ceil(self.guidance.reach_mm / self.spacing[0]))
        return [i for i in range(max(0, s - k), min(n, s + k + 1))
                if i == s or disk_radius_px(self.guidance, (i - s) * self.spacing[0], self.pixel_mm) > 0]

    def prior(self, labels: np.ndarray, slices: Sequence[int], y0: int, x0: int):
        """The current labels' masks of the prior structures ``[n, P, C, C]`` in the window at (y0, x0) of the
        model grid (each model pixel takes the volume voxel it falls in; outside the slice: nothing)."""
        import torch

        c = self.crop
        ys, xs = np.arange(y0, y0 + c), np.arange(x0, x0 + c)
        ri = np.clip(np.floor((ys + 0.5) * self.plane[0] / self.mplane[0]).astype(int), 0, self.plane[0] - 1)
        ci = np.clip(np.floor((xs + 0.5) * self.plane[1] / self.mplane[1]).astype(int), 0, self.plane[1] - 1)
        inside = ((ys >= 0) & (ys < self.mplane[0]))[:, None] & ((xs >= 0) & (xs < self.mplane[1]))[None, :]
        out = np.zeros((len(slices), len(self.prior_values), c, c), np.float32)
        for n, s in enumerate(slices):
            sub = labels[s][np.ix_(ri, ci)]
            for k, v in enumerate(self.prior_values):
                out[n, k] = (sub == v) & inside
        return torch.from_numpy(out)

    def predict(self, slices: Sequence[int], centre: ModelClick, clicks: Sequence[ModelClick],
                labels: np.ndarray | None = None):
        """Class probabilities ``[n, K, C, C]`` of a window centred on ``centre`` in ``slices`` (``labels``:
        the current canonical label map, read by a model with prior masks), and the window's origin
        (row, col) on the model grid."""
        import torch

        c = self.crop
        y0 = int(round(centre.row)) - c // 2
        x0 = int(round(centre.col)) - c // 2
        img = torch.zeros((len(slices), self.spec.image_channels, c, c), dtype=torch.float32)
        ys0, xs0 = max(0, y0), max(0, x0)
        ys1, xs1 = min(self.mplane[0], y0 + c), min(self.mplane[1], x0 + c)
        for n, s in enumerate(slices):
            img[n, :, ys0 - y0:ys1 - y0, xs0 - x0:xs1 - x0] = self.stack[s, ys0:ys1, xs0:xs1]
        maps = torch.stack([draw_maps(self.guidance, (c, c), s * self.spacing[0], clicks, self.pixel_mm, (y0, x0))
                            for s in slices])
        parts = [img, maps]
        if self.prior_values:
            if labels is None:
                labels = np.zeros((int(self.stack.shape[0]),) + self.plane, np.uint8)
            parts.insert(1, self.prior(labels, slices, y0, x0))
        probs = self.runner.forward(torch.cat(parts, 1))
        return probs, (y0, x0)

    def region(self, voxel: tuple[int, int, int], clicks: Sequence[ModelClick], centre: ModelClick,
               labels: np.ndarray | None = None):
        """``(slices, rows, cols, labels)``: the canonical region one click may edit and the network's
        labels there (channel indices ``[n, h, w]``), with every click in ``clicks`` drawn in."""
        import torch
        import torch.nn.functional as F

        slices = self.reached_slices(voxel[0])
        probs, (y0, x0) = self.predict(slices, centre, clicks, labels)
        e_r = int(np.ceil(self.params.edit_mm / self.spacing[1]))
        e_c = int(np.ceil(self.params.edit_mm / self.spacing[2]))
        rows = np.arange(max(0, voxel[1] - e_r), min(self.plane[0], voxel[1] + e_r + 1))
        cols = np.arange(max(0, voxel[2] - e_c), min(self.plane[1], voxel[2] + e_c + 1))
        # the model-grid position of each voxel centre, relative to the window, as grid_sample wants it
        my = (rows + 0.5) * self.mplane[0] / self.plane[0] - 0.5 - y0
        mx = (cols + 0.5) * self.mplane[1] / self.plane[1] - 0.5 - x0
        gy = torch.from_numpy(2 * my / (self.crop - 1) - 1).float()
        gx = torch.from_numpy(2 * mx / (self.crop - 1) - 1).float()
        grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), -1)[None].expand(len(slices), -1, -1, -1)
        sampled = F.grid_sample(probs, grid, mode="bilinear", align_corners=True)
        labels = sampled.argmax(1).numpy()
        inside = ((rows[:, None] - voxel[1]) * self.spacing[1]) ** 2 + ((cols[None, :] - voxel[2]) * self.spacing[2]) ** 2
        return slices, rows, cols, labels, inside <= self.params.edit_mm ** 2


def apply_guided(refiner: GuidedRefiner, work: np.ndarray, editable: np.ndarray, schema, voxels, clicks,
                 first: int) -> list[tuple[int, str]]:
    """Apply clicks ``first..`` (canonical ``voxels``, :class:`refine.Click` ``clicks``) to the canonical
    label map ``work`` in place, every click drawn in as guidance; ``(changed, why)`` per applied click."""
    mclicks = [refiner.model_click(v, c.structure, c.positive) for v, c in zip(voxels, clicks)]
    values = np.array([cls.value for cls in schema.classes])
    out = []
    for i in range(first, len(clicks)):
        click, voxel = clicks[i], voxels[i]
        if mclicks[i].channel < 0:
            out.append((0, f"the model reads no {'positive' if click.positive else 'negative'} clicks on "
                           f"{click.structure}"))
            continue
        target = schema[click.structure].value
        slices, rows, cols, labels, disk = refiner.region(voxel, mclicks, mclicks[i], work)
        changed = 0
        for n, s in enumerate(slices):
            old = work[s][np.ix_(rows, cols)]
            new = values[labels[n]].astype(work.dtype)
            # a positive click only adds its structure, a negative one only takes it away
            grows = (new == target) & (old != target) if click.positive else (old == target) & (new != target)
            ok = editable[s][np.ix_(rows, cols)] & disk & grows
            if ok.any():
                old[ok] = new[ok]
                work[s][np.ix_(rows, cols)] = old
                changed += int(ok.sum())
        changed += _force_clicked_spot(refiner, work, editable, voxel, target if click.positive else
                                       schema.classes[0].value, click.positive, target)
        out.append((changed, "" if changed else "the model's answer there is already the current one"))
    return out


def _force_clicked_spot(refiner: GuidedRefiner, work, editable, voxel, value: int, positive: bool, target: int) -> int:
    """The clicked voxel and its in-slice neighbours within ``FORCE_MM`` get the click's answer whatever the
    network says: a click always changes the spot it was made on, so a protocol (or an annotator)
    repeating a click the network ignores is not stuck."""
    s, r, c = voxel
    rr = int(FORCE_MM // refiner.spacing[1])
    cc = int(FORCE_MM // refiner.spacing[2])
    n = 0
    for i in range(max(0, r - rr), min(work.shape[1], r + rr + 1)):
        for j in range(max(0, c - cc), min(work.shape[2], c + cc + 1)):
            d2 = ((i - r) * refiner.spacing[1]) ** 2 + ((j - c) * refiner.spacing[2]) ** 2
            wrong = (work[s, i, j] != target) if positive else (work[s, i, j] == target)
            if d2 <= FORCE_MM ** 2 and editable[s, i, j] and wrong:
                work[s, i, j] = value
                n += 1
    return n
