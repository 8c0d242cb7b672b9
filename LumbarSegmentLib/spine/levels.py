"""Name every vertebral body and disc of a draft by level, with an ordering check a person can review.

Input: a label map with the classes ``vertebral_body`` and ``intervertebral_disc`` (the default
model's draft, or a manual label reduced to those two classes). Output: a label map holding one
value per level (scheme in :mod:`LumbarSegmentLib.spine.level_names`), the list of levels and flags.

How (all in the canonical sagittal stack, distances in mm):

1. connected pieces of bodies and of discs; pieces under a quarter of a typical piece's volume
   and pieces far from the spine curve are dropped (stray blobs);
2. a smooth curve (polynomial of the anterior-posterior and left-right position against the
   cranio-caudal one) is fitted through the pieces' centres; every piece is ordered by where its
   centre falls along that curve, not by its row;
3. pieces of one class closer along the curve than a third of the level pitch are one structure
   (a body cut in two by a gap); a body twice as long as its neighbours is split at its waist
   (two bodies joined across a missed disc), flagged;
4. bodies and discs must alternate: two bodies with no disc between them give a missing disc
   (flagged, its slot still counted), two discs with no body a missing body;
5. anchor at the caudal end: the lowest disc (or missing-disc slot) is L5-S1, a body below it S1,
   and names go up from there: L5, L4-L5, L4 .. L1, T12-L1, T12 ...
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from LumbarSegmentLib.core.geometry import sagittal_layout
from LumbarSegmentLib.spine.level_names import BODY, DISC, disc_name, level_value, levels_schema
from LumbarSegmentLib.core.schema import LabelSchema
from LumbarSegmentLib.core.volume import Volume

# A flag code -> (factor on the ordering confidence, what it means)
FLAGS = {
    "missing_disc": (0.6, "two vertebral bodies with no disc between them (a missed disc, or a fusion)"),
    "missing_body": (0.6, "two discs with no vertebral body between them"),
    "body_split": (0.8, "one drafted body was as long as two and was split at its waist"),
    "spacing": (0.7, "the distance between neighbouring levels is implausible (a level may be missed or doubled)"),
    "anchor": (0.5, "the names may be one level off at the caudal end: check that L5-S1 is named right"),
    "transitional": (0.5, "the L5-S1 disc is much thinner than L4-L5: a possible transitional vertebra "
                          "(sacralised L5 or lumbarised S1); check the count from S1"),
    "six_lumbar": (0.6, "six lumbar-sized bodies above L5-S1: a possible L6 (or a thoracic level counted as lumbar)"),
    "sacral_disc": (0.9, "a small disc-like piece below a small lowest body was read as the rudimentary S1-S2 disc "
                         "(the body above it named S1)"),
    "s1_from_image": (1.0, "S1 was not drafted: it was outlined from the image below the L5-S1 disc (check its outline)"),
    "few_levels": (0.5, "fewer than two vertebral bodies and one disc found: the names rest on little evidence"),
    "sacrum_anchor": (1.0, "the names count up from the drafted sacrum: S1 is the segment it begins with"),
    "sacrum_split": (0.7, "the drafted sacrum came in two pieces a disc's height apart: the upper one was read as "
                          "L5 over a missed L5-S1 disc (check the count at the caudal end)"),
}
MIN_PIECE_FRACTION = 0.25  # of the median volume of the large pieces of the same class
MAX_CURVE_DISTANCE_MM = 30.0
ANCHOR_FULL_BODY = 0.9  # a lowest body this large against the one above it may be L5, not S1


@dataclass
class Piece:
    structure: str
    mask_index: np.ndarray  # flat indices into the canonical stack
    centroid: np.ndarray  # mm, (s, r, c)
    t: float = 0.0  # position along the spine curve, mm, increasing caudally
    length: float = 0.0  # extent along the curve, mm
    split: bool = False
    edge: bool = False


@dataclass
class Level:
    name: str
    structure: str
    label: int
    voxels: int
    volume_mm3: float
    centroid_mm: list
    flags: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"name": self.name, "structure": self.structure, "label": self.label, "voxels": self.voxels,
                "volume_mm3": round(self.volume_mm3, 1), "flags": list(self.flags)}


@dataclass
class LevelResult:
    labels: Volume  # one value per level, on the input grid
    levels: list  # [Level], cranial to caudal
    flags: list  # [{"code", "message", "level"}]
    confidence: float

    @property
    def schema(self) -> LabelSchema:
        return levels_schema([lv.name for lv in self.levels])

    def to_report(self) -> dict:
        return {"levels": [lv.to_dict() for lv in self.levels],
                "ordering": {"confidence": round(self.confidence, 3), "flags": list(self.flags),
                             "anchor": ("drafted sacrum = S1" if any(f["code"] == "sacrum_anchor" for f in self.flags)
                                        else "lowest disc = L5-S1"),
                             "value_scheme": "bodies C1..L5 = 1..24, S1 = 25, L6 = 26; disc = 100 + its upper vertebra"}}


# ------------------------------------------------------------------------------------- pieces
def _pieces(mask: np.ndarray, spacing, structure: str) -> list[Piece]:
    import SimpleITK as sitk

    if not mask.any():
        return []
    cc = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), False))
    flat = cc.ravel()
    order = np.argsort(flat, kind="stable")
    counts = np.bincount(flat)
    starts = np.concatenate([[0], np.cumsum(counts)])
    sp = np.asarray(spacing, float)
    pieces = []
    for k in range(1, len(counts)):
        idx = order[starts[k]:starts[k + 1]]
        if idx.size == 0:
            continue
        coords = np.stack(np.unravel_index(idx, mask.shape), axis=1)
        pieces.append(Piece(structure, idx, coords.mean(0) * sp))
    return pieces


def _volume(piece: Piece, voxel_mm3: float) -> float:
    return piece.mask_index.size * voxel_mm3


def _drop_fragments(pieces: list[Piece], voxel_mm3: float) -> tuple[list[Piece], int]:
    if not pieces:
        return pieces, 0
    vols = np.array([_volume(p, voxel_mm3) for p in pieces])
    big = vols[vols >= 0.3 * vols.max()]
    ref = float(np.median(big))
    keep = [p for p, v in zip(pieces, vols) if v >= MIN_PIECE_FRACTION * ref]
    return keep, len(pieces) - len(keep)


# ------------------------------------------------------------------------------------- curve
class SpineCurve:
    """``c(r)`` and ``s(r)`` polynomials through piece centres; ``t`` = arc length from the top."""

    def __init__(self, pieces: list[Piece], voxel_mm3: float):
        pts = np.array([p.centroid for p in pieces])
        w = np.sqrt(np.array([_volume(p, voxel_mm3) for p in pieces]))
        deg = int(min(3, max(0, len(pieces) - 2)))
        r = pts[:, 1]
        self.c = np.polynomial.Polynomial.fit(r, pts[:, 2], deg, w=w) if deg else None
        self.s = np.polynomial.Polynomial.fit(r, pts[:, 0], min(deg, 1), w=w) if deg else None
        self.mean = pts.mean(0)
        lo, hi = r.min() - 60.0, r.max() + 60.0
        self.rs = np.linspace(lo, hi, max(64, int(hi - lo) * 2))
        self.path = np.stack([self._s(self.rs), self.rs, self._c(self.rs)], axis=1)
        steps = np.linalg.norm(np.diff(self.path, axis=0), axis=1)
        self.arc = np.concatenate([[0.0], np.cumsum(steps)])

    def _c(self, r):
        return self.c(r) if self.c is not None else np.full_like(r, self.mean[2])

    def _s(self, r):
        return self.s(r) if self.s is not None else np.full_like(r, self.mean[0])

    def locate(self, point) -> tuple[float, float]:
        """``(t, distance)`` of a point (mm) to the curve."""
        d = np.linalg.norm(self.path - np.asarray(point)[None], axis=1)
        i = int(np.argmin(d))
        return float(self.arc[i]), float(d[i])

    def tangent(self, t: float) -> np.ndarray:
        i = int(np.clip(np.searchsorted(self.arc, t), 1, len(self.arc) - 1))
        v = self.path[i] - self.path[i - 1]
        return v / (np.linalg.norm(v) + 1e-9)


def _along(piece: Piece, curve: SpineCurve, shape, spacing) -> np.ndarray:
    """Each voxel's signed position (mm) along the curve tangent at the piece's centre."""
    coords = np.stack(np.unravel_index(piece.mask_index, shape), axis=1) * np.asarray(spacing, float)
    return (coords - piece.centroid) @ curve.tangent(piece.t)


def _measure(pieces, curve, shape, spacing) -> dict:
    """Place each piece on ``curve`` and set its length; returns ``id(piece) -> its voxels' positions along
    the curve`` (:func:`_along`) for callers that need more than the length."""
    along = {}
    for p in pieces:
        p.t, _ = curve.locate(p.centroid)
        a = along[id(p)] = _along(p, curve, shape, spacing)
        p.length = float(np.percentile(a, 98) - np.percentile(a, 2)) if a.size else 0.0
    return along


def _merge_close(pieces: list[Piece], gap: float, spacing) -> list[Piece]:
    """Pieces of one class whose centres lie closer along the curve than ``gap`` are one structure."""
    out: list[Piece] = []
    for p in sorted(pieces, key=lambda q: q.t):
        q = out[-1] if out else None
        if q is not None and q.structure == p.structure and abs(p.t - q.t) < gap:
            n1, n2 = q.mask_index.size, p.mask_index.size
            q.centroid = (q.centroid * n1 + p.centroid * n2) / (n1 + n2)
            q.t = (q.t * n1 + p.t * n2) / (n1 + n2)
            q.mask_index = np.concatenate([q.mask_index, p.mask_index])
            continue
        out.append(p)
    return out


def _split_long_bodies(pieces, curve, shape, spacing) -> list[Piece]:
    """A body about twice as long as the median body is cut at its narrowest cross-section."""
    bodies = [p for p in pieces if p.structure == BODY]
    if len(bodies) < 3:
        return pieces
    typical = float(np.median([p.length for p in bodies]))
    out = []
    for p in pieces:
        if p.structure != BODY or typical < 1.0 or p.length < 1.6 * typical:
            out.append(p)
            continue
        a = _along(p, curve, shape, spacing)
        bins = np.arange(a.min(), a.max() + 1.0, 1.0)
        hist, _ = np.histogram(a, bins=bins)
        mid = slice(int(len(hist) * 0.3), max(int(len(hist) * 0.7), int(len(hist) * 0.3) + 1))
        cut = bins[mid.start + int(np.argmin(hist[mid]))] + 0.5
        sp = np.asarray(spacing, float)
        for part in (a < cut, a >= cut):
            idx = p.mask_index[part]
            if idx.size:
                cen = np.stack(np.unravel_index(idx, shape), axis=1).mean(0) * sp
                out.append(Piece(BODY, idx, cen, split=True))
    return out


# ------------------------------------------------------------------------------------- naming
def _slots(pieces: list[Piece], flags: list) -> list:
    """Pieces top to bottom with ``None`` placeholders where the alternation misses a structure."""
    slots: list = []
    for p in sorted(pieces, key=lambda q: q.t):
        if slots and slots[-1] is not None and slots[-1].structure == p.structure:
            kind = "missing_disc" if p.structure == BODY else "missing_body"
            slots.append((kind, slots[-1], p))
        slots.append(p)
    return slots


def _names_from_anchor(slots: list, lowest_is_s1: bool = False) -> list:
    """A name for each slot, counting up from the lowest disc slot (= L5-S1); with no disc, the lowest body
    is L5, or S1 when it is the drafted sacrum (``lowest_is_s1``)."""
    def is_disc(x):
        return (isinstance(x, tuple) and x[0] == "missing_disc") or (isinstance(x, Piece) and x.structure == DISC)

    disc_idx = [i for i, x in enumerate(slots) if is_disc(x)]
    if disc_idx:
        anchor = disc_idx[-1]
        anchor_rank = 2 * level_value("L5") + 1  # rank: body v -> 2v, disc below v -> 2v+1
    else:  # bodies only (one body): call the lowest L5 (S1 when it is the drafted sacrum)
        anchor = len(slots) - 1
        anchor_rank = 2 * level_value("S1" if lowest_is_s1 else "L5")
    names = []
    for i in range(len(slots)):
        rank = anchor_rank - (anchor - i)
        v = rank // 2
        if v < 1 or rank > 2 * level_value("S1"):
            names.append(None)
        elif rank % 2 == 0:
            names.append(_vertebra(v))
        else:
            names.append(disc_name(_vertebra(v)) if v < level_value("S1") else None)
    return names


def _vertebra(v: int) -> str:
    from LumbarSegmentLib.spine.level_names import vertebra_name

    return vertebra_name(v)


def _flag(flags: list, code: str, level: str | None = None, detail: str = "") -> None:
    msg = FLAGS[code][1] + (f" ({detail})" if detail else "")
    flags.append({"code": code, "level": level, "message": msg})


def _check_spacing(named: list, flags: list) -> None:
    """Neighbouring body centres should be about equally far apart (within 45 % of the median)."""
    bodies = [(n, p) for n, p in named if p.structure == BODY]
    if len(bodies) < 3:
        return
    gaps = np.diff([p.t for _, p in bodies])
    med = float(np.median(gaps))
    for (n1, _), (n2, _), g in zip(bodies, bodies[1:], gaps):
        if abs(g - med) > 0.45 * med:
            _flag(flags, "spacing", f"{n1}/{n2}", f"{g:.0f} mm between body centres, typical {med:.0f} mm")


def _check_anatomy(named: list, flags: list, voxel_mm3: float) -> None:
    by_name = {n: p for n, p in named}
    low, above = by_name.get("L5-S1"), by_name.get("L4-L5")
    if low is not None and above is not None and _volume(low, voxel_mm3) < 0.35 * _volume(above, voxel_mm3):
        _flag(flags, "transitional", "L5-S1", "its volume is under 35 % of L4-L5's")
    lumbar = [by_name[n] for n in ("L1", "L2", "L3", "L4", "L5") if n in by_name]
    t12 = by_name.get("T12")
    if len(lumbar) == 5 and t12 is not None and not _touches_edge(t12):
        ref = float(np.median([_volume(p, voxel_mm3) for p in lumbar[1:]]))
        if _volume(t12, voxel_mm3) > 0.97 * ref:
            _flag(flags, "six_lumbar", "T12", "the body above L1 is as large as L2-L5")


def _touches_edge(piece: Piece) -> bool:
    return piece.edge


def name_levels(labels: Volume, schema: LabelSchema, *, allow_reslice: bool = False,
                image: Volume | None = None) -> LevelResult:
    """Name the draft's bodies and discs by level (see the module docstring).

    With ``image`` (the segmented image, same grid), an S1 the draft lacks is outlined from the
    image below the L5-S1 disc (``sacrum.py``) and flagged ``s1_from_image``.
    """
    layout = sagittal_layout(labels, allow_reslice=allow_reslice)
    stack = np.ascontiguousarray(layout.to_canonical(np.asarray(labels.array)))
    spacing = layout.spacing_src
    voxel_mm3 = float(np.prod(spacing))
    flags: list = []
    pieces, dropped = [], 0
    for structure in (BODY, DISC):
        if structure not in schema:
            continue
        found, n = _drop_fragments(_pieces(stack == schema[structure].value, spacing, structure), voxel_mm3)
        pieces += found
        dropped += n
    pieces = _place(pieces, stack.shape, spacing, voxel_mm3)
    for p in pieces:
        p.edge = _at_edge(p, stack.shape)
    pieces, s1 = _with_sacrum(stack, schema, spacing, voxel_mm3, pieces, flags)
    if s1 is None:
        pieces = _drop_sacral_disc(pieces, flags, voxel_mm3)
    else:
        _flag(flags, "sacrum_anchor", "S1")
    slots = _slots(pieces, flags)
    full_bottom = s1 is None and _full_size_bottom(pieces, voxel_mm3)
    if full_bottom:
        slots.append(("missing_disc", pieces[-1], None))
    names = _names_from_anchor(slots, lowest_is_s1=s1 is not None)
    named, out_levels = [], []
    out = np.zeros(stack.shape, np.uint8)
    for slot, name in zip(slots, names):
        if isinstance(slot, tuple):
            if name is not None and slot[2] is not None:  # the slot below a full-size bottom: flagged as anchor
                _flag(flags, slot[0], name, "between the structures named around it")
            continue
        if name is None:
            continue
        named.append((name, slot))
        out.ravel()[slot.mask_index] = level_value(name)
        out_levels.append(Level(name, slot.structure, level_value(name), int(slot.mask_index.size),
                                slot.mask_index.size * voxel_mm3, [round(float(x), 1) for x in slot.centroid]))
        if slot.split:
            _flag(flags, "body_split", name)
    if image is not None:
        _add_s1(image, layout, stack, named, out, out_levels, flags, voxel_mm3)
    _post_checks(named, flags, voxel_mm3, full_bottom, sacrum=s1 is not None)
    confidence = 1.0
    for f in flags:
        confidence *= FLAGS[f["code"]][0]
        for lv in out_levels:
            if f["level"] and lv.name in str(f["level"]).split("/"):
                lv.flags.append(f["code"])
    result_labels = labels.with_array(layout.from_canonical(out).copy())
    return LevelResult(result_labels, out_levels, flags, confidence)


def _add_s1(image: Volume, layout, stack, named, out, out_levels, flags, voxel_mm3) -> None:
    from LumbarSegmentLib.spine.sacrum import s1_from_image

    by_name = dict(named)
    if "S1" in by_name or "L5-S1" not in by_name or "L5" not in by_name:
        return
    img = layout.to_canonical(np.asarray(image.array, np.float32))
    if img.shape != stack.shape:
        return
    idx = s1_from_image(img, stack, by_name["L5-S1"].mask_index, by_name["L5"].mask_index, layout.spacing_src)
    if idx is None:
        return
    sp = np.asarray(layout.spacing_src, float)
    centroid = np.stack(np.unravel_index(idx, stack.shape), axis=1).mean(0) * sp
    out.ravel()[idx] = level_value("S1")
    out_levels.append(Level("S1", BODY, level_value("S1"), int(idx.size), idx.size * voxel_mm3,
                            [round(float(x), 1) for x in centroid]))
    _flag(flags, "s1_from_image", "S1")


def _post_checks(named, flags, voxel_mm3, full_bottom: bool, sacrum: bool = False) -> None:
    bodies = [p for _, p in named if p.structure == BODY]
    discs = [p for _, p in named if p.structure == DISC]
    if len(bodies) < 2 or not discs:
        _flag(flags, "few_levels", None, f"{len(bodies)} bodies, {len(discs)} discs")
    _check_anchor(named, flags, full_bottom)
    _check_spacing(named, flags)
    _check_anatomy(named, flags, voxel_mm3)
    if not full_bottom:
        from LumbarSegmentLib.spine.anchor_checks import anchor_doubts

        for level, detail in anchor_doubts(named):
            # a drafted sacrum settles S1; a small lowest disc may still be the S1-S2 remnant above it
            if not sacrum or level == "L5-S1":
                _flag(flags, "anchor", level, detail)


def _with_sacrum(stack, schema, spacing, voxel_mm3: float, pieces: list[Piece], flags: list):
    """``(pieces, s1)`` anchored on the drafted sacrum (:mod:`sacrum_anchor`), or ``(pieces, None)`` where
    the model has no sacrum class or drew none at the caudal end of the bodies."""
    bodies = [p for p in pieces if p.structure == BODY]
    if "sacrum" not in schema or len(bodies) < 2:
        return pieces, None
    from LumbarSegmentLib.spine.sacrum_anchor import MIN_SACRUM_FRACTION, anchor_on_sacrum, split_sacrum

    found = _pieces(stack == schema["sacrum"].value, spacing, "sacrum")
    if not found:
        return pieces, None
    median_body = float(np.median([b.mask_index.size for b in bodies]))
    sac, upper = split_sacrum(found, median_body, stack.shape, spacing)
    if sac.mask_index.size < MIN_SACRUM_FRACTION * median_body:
        return pieces, None
    if upper is not None:  # L5 drawn as sacrum: a body, placed (and merged with a drafted part of it) anew,
        pieces = _place(pieces + [Piece(BODY, upper.mask_index, upper.centroid)], stack.shape, spacing, voxel_mm3)
        bodies = [p for p in pieces if p.structure == BODY and not np.isin(upper.mask_index[:1], p.mask_index)[0]]
        _flag(flags, "sacrum_split", "L5")  # that never joins S1 (not in ``ends``)
    curve = SpineCurve(pieces, voxel_mm3)
    sac.t, distance = curve.locate(sac.centroid)
    # the pieces are placed anew on this curve only once the sacrum is taken: a draft whose sacrum is not
    # used is named exactly as a two-class draft
    if distance > 2 * MAX_CURVE_DISTANCE_MM or sac.t <= np.median([curve.locate(b.centroid)[0] for b in bodies]):
        return pieces, None
    along = _measure(pieces + [sac], curve, stack.shape, spacing)
    ends = {id(b): b.t + float(np.percentile(along[id(b)], 95)) for b in bodies}
    t_sac = sac.t + along[id(sac)]
    typical = float(np.median([b.length for b in bodies]))
    return anchor_on_sacrum(sorted(pieces, key=lambda q: q.t), sac, t_sac, ends, typical, (stack.shape, spacing))


def _full_size_bottom(pieces: list[Piece], voxel_mm3: float) -> bool:
    """Whether the lowest piece is a body over a drafted disc, as large as the body above that disc.

    The model drafts S1 only in part (the sacrum is not one of its classes), so such a body is
    read as L5 over a missed L5-S1 disc (a missing-disc slot is put below it), and flagged.
    """
    if len(pieces) < 3 or [p.structure for p in pieces[-3:]] != [BODY, DISC, BODY]:
        return False
    return _volume(pieces[-1], voxel_mm3) >= ANCHOR_FULL_BODY * _volume(pieces[-3], voxel_mm3)


def _check_anchor(named: list, flags: list, full_bottom: bool) -> None:
    bodies = [n for n, p in named if p.structure == BODY]
    if not bodies:
        return
    if full_bottom:
        _flag(flags, "anchor", bodies[-1], "the lowest body is as large as the one above it, so it was named L5 "
              "over a missed L5-S1 disc; if it is S1, shift the names down by one")
    elif bodies[-1] != "S1" and not any(n == "L5-S1" for n, _ in named):
        _flag(flags, "anchor", bodies[-1], "no disc below the lowest body")


def _drop_sacral_disc(pieces: list[Piece], flags: list, voxel_mm3: float) -> list[Piece]:
    """Bottom disc < 40 % of the disc above and the body above it < 50 % of its upper neighbour:
    that is S1 (drafted in part) with the rudimentary S1-S2 disc below, not L5 over L5-S1."""
    if len(pieces) < 5 or pieces[-1].structure != DISC:
        return pieces
    d_low, b_low, d_up, b_up = pieces[-1], pieces[-2], pieces[-3], pieces[-4]
    if (b_low.structure, d_up.structure, b_up.structure) != (BODY, DISC, BODY):
        return pieces
    if (_volume(d_low, voxel_mm3) < 0.4 * _volume(d_up, voxel_mm3)
            and _volume(b_low, voxel_mm3) < 0.5 * _volume(b_up, voxel_mm3)):
        _flag(flags, "sacral_disc", "S1")
        return pieces[:-1]
    return pieces


def _at_edge(piece: Piece, shape) -> bool:
    rows = np.unravel_index(piece.mask_index, shape)[1]
    return bool(rows.min() == 0 or rows.max() == shape[1] - 1)


def _place(pieces: list[Piece], shape, spacing, voxel_mm3: float) -> list[Piece]:
    """Fit the curve, drop pieces far from it, merge near pieces, split long bodies, refit."""
    if not pieces:
        return pieces
    for _ in range(2):
        curve = SpineCurve(pieces, voxel_mm3)
        _measure(pieces, curve, shape, spacing)
        near = [p for p in pieces if curve.locate(p.centroid)[1] <= MAX_CURVE_DISTANCE_MM]
        pieces = near or pieces
    curve = SpineCurve(pieces, voxel_mm3)
    _measure(pieces, curve, shape, spacing)
    bodies = sorted((p for p in pieces if p.structure == BODY), key=lambda q: q.t)
    pitch = float(np.median(np.diff([p.t for p in bodies]))) if len(bodies) >= 2 else 35.0
    pieces = _merge_close(pieces, pitch / 3.0, spacing)
    _measure(pieces, curve, shape, spacing)
    pieces = _split_long_bodies(pieces, curve, shape, spacing)
    _measure(pieces, curve, shape, spacing)
    return sorted(pieces, key=lambda q: q.t)
