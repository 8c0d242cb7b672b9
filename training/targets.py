"""A case's label map -> the training target: one code per voxel, on the volume grid.

A target voxel holds one of:

* a channel index ``0..K-1`` of the schema (a known class; 0 = background, or "background or a
  structure the case does not annotate" under the marginal loss, see ``training.losses``);
* :data:`IGNORE_INDEX` (255): nothing is known here;
* a *set code* ``128 | bits``: the voxel is one of the channels whose bits are set (bit ``k`` =
  channel ``k``). SPIDER's "vertebra" is ``{vertebral_body, posterior_elements}``; a code with one bit
  is that channel *for sure* (e.g. pure background where the marginal loss would otherwise merge
  background with the classes the case does not annotate). 255 is the set of all channels, so
  ignoring it and summing over all channels mean the same thing.

Set codes need ``K <= 7`` channels (bits 0..6). What each source teaches (the data README):

* a structure that is a union in the schema (``schema.unions``) -> the set of its members, and its
  members count as annotated (a voxel outside every "vertebra" is neither body nor posterior element);
* VB1 (mixed sequences): the lowest labelled instance is the S1 segment of the sacrum, not a
  vertebral body -> ``sacrum`` when the schema has it, else unknown (the case's lower sacral
  segments are unlabelled, so ``sacrum`` is not marked annotated);
* ``labels_complete_z_range`` (t1-levels): rows outside it are unknown;
* a sacrum labelled as level S1 only (the case's ``levels``) is a positive; whether the case annotates
  the sacrum depends on where its labels are complete: with ``labels_complete_z_range`` (t1-levels:
  bottom of S1 to top of L1) every row that still counts lies above the lower sacral segments, so
  there the sacrum is known (S1 or not sacrum) and the case annotates it; without such a range the
  lower segments are unlabelled and label 0 may still be sacrum, so it does not;
* a case that labels vertebrae as unions and discs but not the sacrum (SPIDER): its label 0 is pure
  background above the top of the lowest disc (L5/S1); below it the marginal loss lets it be sacrum;
* a whole-vertebra union in a case that also labels the spinal canal (SPIDER) is split at the canal's
  anterior wall when the caller gives the volume's layout (:func:`split_vertebra_at_canal`): what lies
  behind the wall is posterior elements for sure, what lies in front of it vertebral body for sure, a
  band of ``SPLIT_BAND_MM`` either side stays the union. Without it no source teaches posterior elements
  for sure, and a model satisfies the union by drawing every vertebra pixel as body.
"""
from __future__ import annotations

import logging

import numpy as np

from LumbarSegmentLib.core.schema import LabelSchema, SchemaError

log = logging.getLogger("lumbarseg.train")

IGNORE_INDEX = 255
SET_FLAG = 128
MAX_SET_CHANNELS = 7
#: the set code of background alone: background for sure, whatever the case does not annotate
SURE_BACKGROUND = SET_FLAG | 1
#: the case sources whose lowest labelled vertebral-body instance is S1 (the data README)
LOWEST_IS_S1 = ("VB1",)
#: half width (mm) of the band around the canal's anterior wall that stays "body or posterior elements"
SPLIT_BAND_MM = 2.0
#: how far (mm, superior-inferior) the wall of the nearest row with canal is carried to rows without it
SPLIT_REACH_MM = 15.0


def set_code(channels) -> int:
    """The target code meaning "one of these channels" (a single channel gives the sure code)."""
    bits = 0
    for ch in channels:
        if not 0 <= int(ch) < MAX_SET_CHANNELS:
            raise SchemaError(f"channel {ch} cannot be part of a set code (at most {MAX_SET_CHANNELS} channels)")
        bits |= 1 << int(ch)
    return SET_FLAG | bits


def decode_set_codes(target, num_classes: int):
    """``(is_set [B,H,W] bool, members [B,K,H,W] bool)`` of a target tensor holding set codes.

    255 (ignore) is not a set here; channel indices are not sets either.
    """
    import torch

    t = target.long()
    is_set = (t >= SET_FLAG) & (t != IGNORE_INDEX)
    bits = torch.where(is_set, t - SET_FLAG, torch.zeros_like(t))
    shifts = torch.arange(num_classes, device=t.device).view(1, -1, 1, 1)
    members = ((bits[:, None] >> shifts) & 1).bool() & is_set[:, None]
    return is_set, members


def _rows(mask: np.ndarray) -> np.ndarray:
    """z indices (axis 0 of a ``[z, y, x]`` array) where ``mask`` has a voxel."""
    return np.nonzero(mask.any(axis=(1, 2)))[0]


def lowest_run_top(mask: np.ndarray) -> int | None:
    """Top z row of the lowest run of consecutive rows holding ``mask`` (the lowest disc), or None."""
    rows = _rows(mask)
    if not len(rows):
        return None
    gaps = np.nonzero(np.diff(rows) > 1)[0]
    return int(rows[gaps[0]]) if len(gaps) else int(rows[-1])


def lowest_instance(labels: np.ndarray, values) -> int | None:
    """The label value (of ``values``) whose voxels have the lowest mean z row."""
    best, best_z = None, None
    for v in values:
        z = np.nonzero(labels == v)[0]
        if len(z) and (best_z is None or z.mean() < best_z):
            best, best_z = int(v), float(z.mean())
    return best


def case_target(case, label: np.ndarray, schema: LabelSchema, source: str = "",
                layout=None) -> tuple[np.ndarray, tuple[str, ...]]:
    """``(target codes uint8 [z,y,x], structures annotated in the schema)`` for one case (module doc).

    Structures the schema neither has nor forms as a union stay background, as before (logged).
    ``layout`` (the label volume's ``core.geometry.SagittalLayout``) turns on the split of a whole-vertebra
    union at the spinal canal; scoring leaves it off so the truth stays what the annotators drew.
    """
    label = np.asarray(label)
    out = np.zeros(label.shape, dtype=np.uint8)
    ch = schema.channel_of()
    annotated: list[str] = []
    dropped = []
    for structure in case.annotated_structures:
        if structure in schema.unions:
            annotated += [m for m in schema.unions[structure] if m not in annotated]
        elif structure in schema:
            partial = _only_s1(case, structure) and "labels_complete_z_range" not in case.extra
            annotated += [structure] if structure not in annotated and not partial else []
        else:
            dropped.append(structure)
    if dropped:
        log.info("case %s: structures %s are not in schema %r and count as background", case.case_id, dropped,
                 schema.name)
    for value, structure in case.labels.items():
        if structure in schema.unions:
            code = set_code(ch[m] for m in schema.unions[structure])
        elif structure in schema:
            code = ch[structure]
        else:
            continue
        out[label == int(value)] = code
    if layout is not None:
        split_vertebra_at_canal(out, schema, layout)
    if source in LOWEST_IS_S1:
        _lowest_body_is_s1(case, label, out, schema)
    if "labels_complete_z_range" in case.extra:
        lo, hi = (int(x) for x in case.extra["labels_complete_z_range"])
        out[:max(0, lo)] = IGNORE_INDEX
        out[hi + 1:] = IGNORE_INDEX
    if (any(s in schema.unions for s in case.annotated_structures) and "intervertebral_disc" in case.annotated_structures
            and "sacrum" in schema and "sacrum" not in case.annotated_structures):
        top = lowest_run_top(out == ch["intervertebral_disc"])
        if top is not None:
            above = out[top + 1:]
            above[above == 0] = SURE_BACKGROUND
    structures = tuple(annotated)
    return out, structures


def _only_s1(case, structure: str) -> bool:
    """True when every label value of ``structure`` is level S1 (one segment of the sacrum outlined)."""
    levels = case.extra.get("levels")
    if structure != "sacrum" or not isinstance(levels, dict):
        return False
    values = [str(v) for v, s in case.labels.items() if s == structure]
    return bool(values) and all(str(levels.get(v, "")).upper() == "S1" for v in values)


def _lowest_body_is_s1(case, label: np.ndarray, out: np.ndarray, schema: LabelSchema) -> None:
    values = [v for v, s in case.labels.items() if s == "vertebral_body"]
    s1 = lowest_instance(label, values)
    if s1 is None:
        return
    out[label == s1] = schema.channel_of()["sacrum"] if "sacrum" in schema else IGNORE_INDEX


def _anterior_wall(canal: np.ndarray, reach: int) -> np.ndarray:
    """Per canonical row: the median over slices of the canal's first column (NaN where unknown)."""
    r = canal.shape[1]
    first = np.where(canal.any(axis=2), canal.argmax(axis=2), -1).astype(float)  # [s, r]
    first[first < 0] = np.nan
    known = ~np.isnan(first).all(axis=0)
    wall = np.full(r, np.nan)
    if not known.any():
        return wall
    wall[known] = np.nanmedian(first[:, known], axis=0)
    rows = np.nonzero(known)[0]
    near = np.abs(np.arange(r)[:, None] - rows[None, :]).min(axis=1) <= reach
    wall[near & ~known] = np.interp(np.nonzero(near & ~known)[0], rows, wall[rows])
    return wall


def split_vertebra_at_canal(out: np.ndarray, schema: LabelSchema, layout) -> None:
    """Split the whole-vertebra union of ``out`` (in place) at the spinal canal's anterior wall (module doc).

    Anatomy, not a learned rule: the vertebral body lies in front of the canal and every posterior
    element (pedicles, laminae, processes) at or behind its anterior wall. The wall of each
    superior-inferior row is the median over slices of the canal's most anterior voxel, so lateral
    slices that cut no canal still get one; rows far from any canal keep the union.
    """
    ch = schema.channel_of()
    if not {"vertebral_body", "posterior_elements", "spinal_canal"} <= set(ch):
        return
    union = set_code((ch["vertebral_body"], ch["posterior_elements"]))
    canon = layout.to_canonical(out)  # a view of ``out``, [s, r, c]; c grows toward posterior
    vert = canon == union
    canal = canon == ch["spinal_canal"]
    if not vert.any() or not canal.any():
        return
    row_mm, col_mm = layout.spacing_src[1], layout.spacing_src[2]
    wall = _anterior_wall(canal, int(round(SPLIT_REACH_MM / row_mm)))
    band = SPLIT_BAND_MM / col_mm
    cols = np.arange(canon.shape[2])[None, None, :]
    w = wall[None, :, None]
    with np.errstate(invalid="ignore"):
        canon[vert & (cols < w - band)] = ch["vertebral_body"]
        canon[vert & (cols > w + band)] = ch["posterior_elements"]
