"""Level segments in a segmentation node: the list a person reviews, flags, and renaming.

A level draft (``lumbarseg segment --levels``, or ``labels_to_segmentation`` with
``levels.LevelResult.schema``) holds one segment per level, named ``L1`` .. ``L5``, ``L4-L5`` ...
These functions take the node (desktop Slicer's or a test scene's) and never a front end:

* :func:`level_list` - the level segments cranial to caudal, with their flags for review;
* :func:`tag_flags` - store the ordering check's flags on the segments (they move with a rename);
* :func:`shift_level_names` - every name one level up or down (a count that was off by one):
  name, colour, terminology and class tag change together, all or none;
* :func:`rename_level` - one segment to a given level name, refusing a name already in use.
"""
from __future__ import annotations

from LumbarSegmentLib.spine.level_names import level_class, levels_schema, shift_name, sort_key, structure_of
from LumbarSegmentLib.slicer.bridge import get_tag, segment_ids
from LumbarSegmentLib.slicer.drafts import style_segment
from LumbarSegmentLib.core.schema import SchemaError

FLAGS_TAG = "LumbarSegment.LevelFlags"


def _level_of(segment) -> str | None:
    """The level a segment's name stands for, or None for a segment that is not a level."""
    from LumbarSegmentLib.spine.level_names import level_value

    name = (segment.GetName() or "").strip()
    try:
        level_value(name)
    except SchemaError:
        return None
    return name


def level_list(seg_node) -> list[dict]:
    """``[{"segment_id", "name", "structure", "label", "flags"}]`` cranial to caudal (non-level segments left out)."""
    from LumbarSegmentLib.spine.level_names import level_value

    seg = seg_node.GetSegmentation()
    rows = []
    for sid in segment_ids(seg_node):
        segment = seg.GetSegment(sid)
        name = _level_of(segment)
        if name is None:
            continue
        flags = [f for f in (get_tag(segment, FLAGS_TAG) or "").split(",") if f]
        rows.append({"segment_id": sid, "name": name, "structure": structure_of(level_value(name)),
                     "label": level_value(name), "flags": flags})
    return sorted(rows, key=lambda r: sort_key(r["name"]))


def tag_flags(seg_node, levels_report: list[dict]) -> None:
    """Put each level's flag codes (the report's ``levels[*].flags``) on the segment of that name."""
    by_name = {lv["name"]: lv.get("flags", []) for lv in levels_report}
    seg = seg_node.GetSegmentation()
    for row in level_list(seg_node):
        seg.GetSegment(row["segment_id"]).SetTag(FLAGS_TAG, ",".join(by_name.get(row["name"], [])))


def _restyle(segment, name: str) -> None:
    style_segment(segment, levels_schema([name]), level_class(name))


def shift_level_names(seg_node, steps: int) -> list[str]:
    """Rename every level segment ``steps`` levels down (positive: L4 -> L5) or up; returns the new names.

    All names are checked first: if one would leave the scheme (below S1, a disc below L5-S1)
    nothing is renamed and the reason is raised.
    """
    rows = level_list(seg_node)
    new = {r["segment_id"]: shift_name(r["name"], steps) for r in rows}  # raises before any change
    seg = seg_node.GetSegmentation()
    for sid, name in new.items():
        _restyle(seg.GetSegment(sid), name)
    return [new[r["segment_id"]] for r in rows]


def rename_level(seg_node, segment_id: str, name: str) -> None:
    """Give one segment a level name (``"L6"``, ``"L5-L6"`` is refused: discs are named by their upper level)."""
    level_class(name)  # validates the name
    seg = seg_node.GetSegmentation()
    if seg.GetSegment(segment_id) is None:
        raise SchemaError(f"no segment {segment_id!r} in {seg_node.GetName()}")
    taken = [r for r in level_list(seg_node) if r["name"] == name and r["segment_id"] != segment_id]
    if taken:
        raise SchemaError(f"another segment ({taken[0]['segment_id']}) is already named {name}; rename it first")
    _restyle(seg.GetSegment(segment_id), name)
