"""Cases -> cached model-plane slices -> foreground-aware training patches.

Every case is turned into what the model sees with the same two functions the
inference engine uses (``preprocess.model_slices`` / ``preprocess.label_slices``),
so training and inference preprocessing cannot drift apart. The slices are kept in
memory (float32 image, uint8 label) together with the case's *annotated* mask: a
bool vector over the schema's classes saying which structures the case's label
map is complete for (background is always marked; see ``LumbarSegmentLib.training.losses``).

Patches are drawn by :class:`PatchSampler`: a case is picked (by default so that
every group of cases with the same annotated structures gets the same share of
patches, so three disc cases are not drowned by ten vertebra cases), then a slice
and a centre - with probability ``fg_fraction`` on a random foreground pixel, else
anywhere. The sampler returns a *context crop* twice the patch size around that
centre; :mod:`LumbarSegmentLib.training.augment` cuts the final patch out of it with one batched
``affine_grid``/``grid_sample`` on the training device, so rotation and zoom-out
see real image content instead of zero padding.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from LumbarSegmentLib.dataset import cases as _cases
from LumbarSegmentLib.dataset import dataset as _dataset
from LumbarSegmentLib.inference import preprocess
from LumbarSegmentLib.core.files import sha256_file
from LumbarSegmentLib.core.schema import LabelSchema, SchemaError, load_schema, remap_labels

from .targets import IGNORE_INDEX, SURE_BACKGROUND, case_target  # 255 = "no information"; set codes: targets

log = logging.getLogger("lumbarseg.train")


class DataError(ValueError):
    """The training data cannot be used as given."""


@dataclass
class CaseSlices:
    """One case at the model's in-plane spacing, canonical sagittal order."""

    case_id: str
    patient: str
    image: torch.Tensor  # [S, H, W] float32 (z-scored)
    label: torch.Tensor  # [S, H, W] uint8, channel indices of the schema (not label values)
    annotated: torch.Tensor  # [K] bool, schema channel order; [0] (background) always True
    structures: tuple[str, ...] = ()
    fg_slices: list[int] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    source: str = ""  # acquisition source (data set / site), for balanced sampling and per-source reports

    @property
    def num_slices(self) -> int:
        return int(self.image.shape[0])

    def nbytes(self) -> int:
        return self.image.numel() * 4 + self.label.numel()


def case_source(case: _cases.Case) -> str:
    """The source a case comes from: its case.json ``source`` (or ``group``) field, else the part of
    its id before the first ``_`` (``VB3_12`` -> ``VB3``), else the id itself.

    Sources differ in contrast and resolution far more than cases within a source do; the
    sampler balances them and the validation report is broken down by them.
    """
    for key in ("source", "group"):
        v = case.extra.get(key)
        if isinstance(v, str) and v.strip():
            return v.strip()
    head = case.case_id.split("_", 1)[0]
    return head if head != case.case_id else case.case_id


def as_schema(schema: LabelSchema | str) -> LabelSchema:
    return schema if isinstance(schema, LabelSchema) else load_schema(schema)


def annotated_mask(structures: Iterable[str], schema: LabelSchema) -> torch.Tensor:
    """Bool vector over ``schema``'s channels: the classes a case's label map is complete for."""
    structures = set(structures)
    m = torch.tensor([c.id in structures for c in schema.classes], dtype=torch.bool)
    m[schema.channel_of()["background"]] = True
    return m


def schema_labels(case: _cases.Case, label_volume, schema: LabelSchema) -> tuple[np.ndarray, tuple[str, ...]]:
    """The case's label map in the schema's values and the structures it annotates *in that schema*.

    A structure the schema does not have is background from that schema's point of view
    (it is not one of its classes), so it is mapped to 0 rather than refused.
    """
    try:
        arr = _cases.class_label_map(case, label_volume, schema)
    except SchemaError:
        arr = remap_labels(label_volume.array, case.labels, schema, unknown="background")
        dropped = sorted(set(case.annotated_structures) - set(schema.ids))
        log.info("case %s: structures %s are not in schema %r and count as background",
                 case.case_id, dropped, schema.name)
    structures = tuple(s for s in case.annotated_structures if s in schema)
    return arr, structures


def load_case_slices(case: _cases.Case, schema: LabelSchema | str, spacing_mm: Sequence[float] = (1.0, 1.0)
                     ) -> CaseSlices:
    schema = as_schema(schema)
    image, label = case.load()
    stack, layout, info = preprocess.model_slices(image, tuple(float(s) for s in spacing_mm))
    # training targets are channel indices (mapped by class id), set codes and unknowns (training.targets)
    codes, structures = case_target(case, label.array, schema, case_source(case), layout=layout)  # label on the image's grid
    if not structures:
        raise DataError(f"case {case.case_id} annotates none of the classes of schema {schema.name!r} "
                        f"(it annotates {case.annotated_structures})")
    from .case_warnings import case_warnings

    case_warnings(case.case_id, image.array, label.array, structures)  # NaN/Inf voxels, an empty label: said, not silent
    lab = preprocess.label_slices(codes, layout, tuple(stack.shape[1:])).to(torch.uint8)
    fg = foreground(lab).flatten(1).any(1).nonzero().flatten().tolist()
    return CaseSlices(case_id=case.case_id, patient=case.patient, image=stack.float().contiguous(),
                      label=lab.contiguous(), annotated=annotated_mask(structures, schema),
                      structures=structures, fg_slices=fg, info={"layout": layout.to_dict()},
                      source=case_source(case))


def foreground(lab: torch.Tensor) -> torch.Tensor:
    """Voxels of a target that hold a structure (a class or a set of classes), not background or unknown."""
    return (lab > 0) & (lab != IGNORE_INDEX) & (lab != SURE_BACKGROUND)


def ignore_beyond_levels(data: Sequence[CaseSlices], band_mm: float, row_mm: float = 1.0,
                         margin_mm: float = 2.0) -> dict[str, int]:
    """Make the ``band_mm`` of rows just above and just below each case's labelled levels "unknown".

    Why: the sources label different stretches of the spine (water-fat L1-L5, T2w TSE T11-L5, the
    mixed source often down to S1, the disc set L1/L2-L5/S1). Outside its stretch a case's label says
    "background" over real vertebrae, so one source teaches that S1 or T12 is not a vertebral body
    while another labels it as one, and the model learns to stop short. The scores (level-range Dice)
    only look at the labelled stretch; training can do the same: rows more than ``margin_mm`` (the
    metric's margin) beyond the outermost labelled voxel, up to ``band_mm`` further, get
    ``IGNORE_INDEX``. Rows further still keep their background, so the pelvis and thorax stay taught.
    Rows are the model plane's superior-inferior axis (``CaseSlices.label`` is ``[S, H, W]``).
    Returns ``{case id: rows ignored}``.
    """
    done = {}
    if band_mm <= 0:
        return done
    m, b = int(round(margin_mm / row_mm)), int(round(band_mm / row_mm))
    for c in data:
        lab = c.label
        rows = foreground(lab).any(dim=2).any(dim=0).nonzero().flatten()
        if not len(rows):
            continue
        top, bottom = int(rows.min()) - m, int(rows.max()) + m + 1  # rows [top, bottom) keep their labels
        above = slice(max(0, top - b), max(0, top))
        below = slice(min(lab.shape[1], bottom), min(lab.shape[1], bottom + b))
        lab[:, above] = IGNORE_INDEX
        lab[:, below] = IGNORE_INDEX
        done[c.case_id] = (above.stop - above.start) + (below.stop - below.start)
    return done


def load_dataset(case_list: Sequence[_cases.Case], schema: LabelSchema | str,
                 spacing_mm: Sequence[float] = (1.0, 1.0)) -> list[CaseSlices]:
    """Preprocess and cache ``case_list`` in memory (in the given order)."""
    schema = as_schema(schema)
    out = [load_case_slices(c, schema, spacing_mm) for c in case_list]
    mb = sum(c.nbytes() for c in out) / 2**20
    log.info("cached %d cases (%d slices, %.0f MiB) at %s mm", len(out), sum(c.num_slices for c in out), mb,
             tuple(spacing_mm))
    return out


def data_folders(folder: str | Path) -> list[Path]:
    """``--data``: one dataset folder, or several separated by commas (sources kept in their own folders)."""
    return _dataset.data_folders(folder)


def select_cases(folder: str | Path, ids: Sequence[str] | None = None, exclude: Sequence[str] = ()
                 ) -> list[_cases.Case]:
    """Cases of a dataset folder or of several (``a,b``; newest export of each), optionally only ``ids``,
    minus ``exclude`` (:meth:`dataset.Dataset.cases`). A case id found in two folders is refused."""
    try:
        return _dataset.Dataset(folder).cases(ids, exclude)
    except _dataset.SelectionError as exc:
        raise DataError(str(exc)) from None


# --------------------------------------------------------------------------------------
def data_manifest(case_list: Sequence[_cases.Case]) -> dict:
    """What exactly was trained on: case ids, versions, patients and file sha256s (+ its own sha256)."""
    entries = []
    for c in sorted(case_list, key=lambda c: c.case_id):
        entries.append({
            "case": c.case_id, "version": c.version, "patient": c.patient,
            "annotated_structures": list(c.annotated_structures),
            "image_sha256": sha256_file(c.image_path), "label_sha256": sha256_file(c.label_path),
        })
    return {"cases": entries, "sha256": entries_sha256(entries)}


def entries_sha256(entries: Sequence[dict]) -> str:
    """The sha256 of data-manifest entries in one canonical JSON form (what ``data_manifest_sha256`` records)."""
    return hashlib.sha256(json.dumps(list(entries), sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# --------------------------------------------------------------------------------------
def _crop(t: torch.Tensor, cy: int, cx: int, size: int, fill) -> torch.Tensor:
    """``size``x``size`` window of a 2D tensor centred on (cy, cx), padded with ``fill`` outside."""
    h, w = t.shape
    out = torch.full((size, size), fill, dtype=t.dtype)
    y0, x0 = cy - size // 2, cx - size // 2
    sy0, sx0 = max(0, y0), max(0, x0)
    sy1, sx1 = min(h, y0 + size), min(w, x0 + size)
    if sy1 > sy0 and sx1 > sx0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = t[sy0:sy1, sx0:sx1]
    return out


def _slab(image: torch.Tensor, centre: int, width: int) -> torch.Tensor:
    """The mean of ``width`` slices of ``image [S,H,W]`` around ``centre``, kept inside the stack
    (one slice: that slice, the edge slice beyond the ends)."""
    n = image.shape[0]
    if width == 1:
        return image[min(max(0, centre), n - 1)]
    a = min(max(0, centre - width // 2), max(0, n - width))
    return image[a:a + width].mean(0)


@dataclass(frozen=True)
class ThickSlabs:
    """Thick-slice augmentation of :class:`PatchSampler`: with probability ``p`` a patch is the mean of
    ``w`` neighbouring slices, ``w`` uniform in 2..``max_width``."""
    p: float = 0.0
    max_width: int = 5


def replay_weights(sources: Sequence[str], is_replay: Sequence[bool], fraction: float,
                   base: Sequence[float]) -> list[float]:
    """Sampling weights: the team's cases keep their relative ``base`` weights and share ``1 - fraction``;
    the replayed cases share ``fraction``, each source equally, each case of a source equally."""
    team_total = sum(w for w, r in zip(base, is_replay) if not r)
    per_source = Counter(s for s, r in zip(sources, is_replay) if r)
    if not per_source or fraction <= 0:
        return [0.0 if r else w for w, r in zip(base, is_replay)]
    if team_total <= 0:
        fraction = 1.0
    return [fraction / len(per_source) / per_source[s] if r else (1.0 - fraction) * w / team_total
            for w, s, r in zip(base, sources, is_replay)]


@dataclass(frozen=True)
class Replayed:
    """The cases of a training set that are replayed (``training.replay``) and their share of each batch."""

    ids: frozenset = frozenset()
    fraction: float = 0.0


class PatchSampler:
    """Draws batches of context crops (2x patch) with their labels and annotated masks.

    ``balance``: ``structures`` gives every group of cases with the same annotated structures the
    same share; ``sources`` gives every (source, structures) group the same share, so 39 water-fat
    cases do not drown four mixed-sequence ones; ``cases`` and ``slices`` weigh uniformly.

    ``slabs`` (:class:`ThickSlabs`, thick-slice augmentation): with probability ``slabs.p`` the image crop
    is the mean of ``w`` neighbouring slices (``w`` uniform in 2..``slabs.max_width``) around the labelled one: the
    partial-volume look of a 3-5 mm clinical stack when the cases are 1 mm. The label stays the
    centre slice's, as the nearest-neighbour label of a thick slice would be.

    ``slice_context`` ``k`` > 0 (2.5D models): the image crop has ``2 k + 1`` channels, the
    labelled slice and ``k`` neighbours on each side in slice order, as the engine feeds them
    (``slice_smoothing.neighbour_stack``; the stack's edge slice stands in beyond its ends). A
    thick-slab patch takes its neighbours one slab width apart, each one a slab itself: what the
    neighbours of a slice of a clinical stack of that thickness look like.
    """

    BALANCES = ("structures", "sources", "cases", "slices")

    def __init__(self, data: Sequence[CaseSlices], patch: int = 256, fg_fraction: float = 0.67,
                 balance: str = "structures", context: float = 2.0, jitter: float = 0.25,
                 slabs: ThickSlabs = ThickSlabs(), slice_context: int = 0):
        slab_p, slab_max = slabs.p, slabs.max_width
        if not data:
            raise DataError("no training cases")
        if balance not in self.BALANCES:
            raise DataError(f"balance must be one of {'|'.join(self.BALANCES)}, got {balance!r}")
        if not 0 <= slab_p <= 1 or slab_max < 2:
            raise DataError("slab_p must be in [0, 1] and slab_max >= 2")
        if int(slice_context) < 0:
            raise DataError("slice_context must be >= 0")
        self.slab_p, self.slab_max = float(slab_p), int(slab_max)
        self.slice_context = int(slice_context)
        self.data = list(data)
        self.patch = int(patch)
        self.crop = int(math.ceil(self.patch * context / 2) * 2)
        self.fg_fraction = float(fg_fraction)
        self.jitter = float(jitter)
        if balance == "structures":
            groups: dict[tuple, int] = {}
            for c in self.data:
                groups[c.structures] = groups.get(c.structures, 0) + 1
            w = [1.0 / groups[c.structures] for c in self.data]
        elif balance == "sources":
            sgroups: dict[tuple, int] = {}
            for c in self.data:
                sgroups[(c.source, c.structures)] = sgroups.get((c.source, c.structures), 0) + 1
            w = [1.0 / sgroups[(c.source, c.structures)] for c in self.data]
        elif balance == "cases":
            w = [1.0] * len(self.data)
        else:
            w = [float(c.num_slices) for c in self.data]
        self.case_weights = torch.tensor(w, dtype=torch.float64) / sum(w)

    def replaying(self, replay: Replayed) -> "PatchSampler":
        """Give the replayed cases (``training.replay``) their share of each batch; returns self."""
        if replay.ids:
            w = replay_weights([c.source for c in self.data], [c.case_id in replay.ids for c in self.data],
                               replay.fraction, self.case_weights.tolist())
            self.case_weights = torch.tensor(w, dtype=torch.float64) / sum(w)
        return self

    @property
    def num_fg_slices(self) -> int:
        return sum(len(c.fg_slices) for c in self.data)

    def _centre(self, c: CaseSlices, gen: torch.Generator) -> tuple[int, int, int]:
        _, h, w = c.image.shape
        r = lambda n: int(torch.randint(n, (1,), generator=gen))  # noqa: E731
        if c.fg_slices and float(torch.rand((), generator=gen)) < self.fg_fraction:
            s = c.fg_slices[r(len(c.fg_slices))]
            lab = c.label[s]
            pts = foreground(lab).nonzero()  # never empty: fg_slices hold foreground
            cy, cx = (int(v) for v in pts[r(len(pts))])
            j = int(self.patch * self.jitter)
            if j:
                cy += r(2 * j + 1) - j
                cx += r(2 * j + 1) - j
            return s, cy, cx
        return r(c.num_slices), r(h), r(w)

    def sample(self, batch_size: int, gen: torch.Generator):
        """``(image [B,2k+1,C,C] float32, label [B,C,C] uint8, annotated [B,K] bool)``, C = context crop,
        k = ``slice_context``."""
        idx = torch.multinomial(self.case_weights, batch_size, replacement=True, generator=gen).tolist()
        imgs, labs, ann = [], [], []
        for i in idx:
            c = self.data[i]
            s, cy, cx = self._centre(c, gen)
            w = 1
            if self.slab_p > 0 and float(torch.rand((), generator=gen)) < self.slab_p and c.num_slices > 1:
                w = 2 + int(torch.randint(self.slab_max - 1, (1,), generator=gen))
            k = self.slice_context
            imgs.append(torch.stack([_crop(_slab(c.image, s + o * w, w), cy, cx, self.crop, 0.0)
                                     for o in range(-k, k + 1)]))
            labs.append(_crop(c.label[s], cy, cx, self.crop, 0))
            ann.append(c.annotated)
        return torch.stack(imgs), torch.stack(labs), torch.stack(ann)


def epoch_generator(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """The random stream of one epoch on one process: a pure function of (seed, epoch, rank),
    so a resumed run draws exactly the patches the uninterrupted run would have drawn."""
    h = hashlib.sha256(f"{seed}:{epoch}:{rank}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))
