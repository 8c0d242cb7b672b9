"""Spine level names, their label values, colours and terminology (no image work here).

Value scheme of a level label map (``lumbarseg segment --levels``):

* a vertebra (its body) gets its ordinal counted down from C1: C1..C7 = 1..7, T1..T12 = 8..19,
  L1..L5 = 20..24, S1 = 25, and L6 (a sixth lumbar-type vertebra, only when a person names it) 26;
* a disc gets 100 + the value of the vertebra above it: T12-L1 = 119, L1-L2 = 120 .. L4-L5 = 123,
  L5-S1 = 124 (L6-S1 = 126).

So the value alone says the structure (< 100 body, >= 100 disc) and the level; 0 stays background.
Shifting names by one level (a person decides the count was off by one) moves every name one step
along C1 .. T12, L1 .. L5, S1 (L6 is never reached by a shift: it is a deliberate rename).
"""
from __future__ import annotations

import colorsys

from LumbarSegmentLib.core.schema import BACKGROUND_ID, TERMINOLOGY_CONTEXT, LabelClass, LabelSchema, SchemaError

BODY, DISC = "vertebral_body", "intervertebral_disc"
VERTEBRAE = tuple([f"C{i}" for i in range(1, 8)] + [f"T{i}" for i in range(1, 13)] + [f"L{i}" for i in range(1, 6)]
                  + ["S1"])
L6_VALUE = 26
DISC_OFFSET = 100
_ANATOMY = ("SCT", "123037004", "Anatomical Structure")
_BODY_TYPE = ("SCT", "5001000", "Vertebral body")
_DISC_TYPE = ("SCT", "360499006", "Intervertebral disc")
# SNOMED CT vertebra concepts used as the anatomic region modifier of a body segment (lumbar and
# lower thoracic levels, the ones a lumbar study shows).
_VERTEBRA_CODES = {
    "T9": "82687006", "T10": "7610001", "T11": "12989004", "T12": "23215003", "L1": "66794005",
    "L2": "14293000", "L3": "36470004", "L4": "11994002", "L5": "49668003", "S1": "54735007",
}
_VERTEBRA_MEANING = {"S1": "Sacrum"}  # no S1-only concept in the lists Slicer ships; the sacrum it belongs to


def vertebra_value(name: str) -> int:
    if name == "L6":
        return L6_VALUE
    try:
        return VERTEBRAE.index(name) + 1
    except ValueError:
        raise SchemaError(f"unknown vertebra {name!r}; use C1..C7, T1..T12, L1..L5, L6 or S1") from None


def vertebra_name(value: int) -> str:
    if value == L6_VALUE:
        return "L6"
    if not 1 <= value <= len(VERTEBRAE):
        raise SchemaError(f"label value {value} is not a vertebra of the level scheme")
    return VERTEBRAE[value - 1]


def disc_name(upper: str) -> str:
    """``"L4"`` -> ``"L4-L5"``; ``"L5"`` -> ``"L5-S1"``; ``"L6"`` -> ``"L6-S1"``."""
    if upper == "L6":
        return "L6-S1"
    v = vertebra_value(upper)
    if v >= len(VERTEBRAE):
        raise SchemaError(f"no disc below {upper} in the level scheme")
    return f"{upper}-{VERTEBRAE[v]}"


def level_value(name: str) -> int:
    """Label value of a level name (``"L3"``, ``"L4-L5"``)."""
    if "-" in name:
        upper = name.split("-", 1)[0]
        if disc_name(upper) != name:
            raise SchemaError(f"{name!r} is not a disc of neighbouring levels (did you mean {disc_name(upper)!r}?)")
        return DISC_OFFSET + vertebra_value(upper)
    return vertebra_value(name)


def level_name(value: int) -> str:
    value = int(value)
    if value >= DISC_OFFSET:
        return disc_name(vertebra_name(value - DISC_OFFSET))
    return vertebra_name(value)


def structure_of(value: int) -> str:
    return DISC if int(value) >= DISC_OFFSET else BODY


def shift_name(name: str, steps: int) -> str:
    """The name ``steps`` levels further down (positive: caudal, L4 -> L5) or up (negative)."""
    value = level_value(name)
    disc = value >= DISC_OFFSET
    v = (value - DISC_OFFSET) if disc else value
    if v == L6_VALUE:
        v = vertebra_value("L5") + 1  # an L6 shifts like the level below L5
    new = v + steps
    limit = len(VERTEBRAE) - (1 if disc else 0)
    if not 1 <= new <= limit:
        raise SchemaError(f"{name} cannot move {abs(steps)} level(s) {'down' if steps > 0 else 'up'}: "
                          f"the names run from C1 to S1")
    return level_name(new + (DISC_OFFSET if disc else 0))


def level_color(name: str) -> tuple[int, int, int]:
    """A colour per level: bodies warm (bone) hues, discs cool hues, neighbours clearly apart."""
    value = level_value(name)
    disc = value >= DISC_OFFSET
    k = (value - DISC_OFFSET) if disc else value
    if disc:
        hue, sat, val = (0.50 + 0.07 * (k % 5)) % 1.0, 0.55, 0.90
    else:
        hue, sat, val = (0.02 + 0.035 * (k % 5)), 0.45 + 0.08 * (k % 2), 0.95
    r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
    return (int(round(r * 255)), int(round(g * 255)), int(round(b * 255)))


def class_id(name: str) -> str:
    return name.lower().replace("-", "_")


def level_class(name: str) -> LabelClass:
    """The schema class of one level: id ``l4_l5``, name ``L4-L5``, its value, colour and codes.

    A body's terminology is "Vertebral body" with the vertebra (e.g. SNOMED CT 66794005, L1
    vertebra) as its modifier; a disc's is "Intervertebral disc" (its level is in the name).
    """
    value = level_value(name)
    modifier, note = None, ""
    if value < DISC_OFFSET:
        code = _VERTEBRA_CODES.get(name)
        if code:
            modifier = ("SCT", code, _VERTEBRA_MEANING.get(name, f"{name} vertebra"))
        note = "level as modifier; verify the concept ids against a current SNOMED CT release"
    return LabelClass(value=value, id=class_id(name), name=name, color=level_color(name), category=_ANATOMY,
                      type=_BODY_TYPE if value < DISC_OFFSET else _DISC_TYPE, modifier=modifier, code_note=note)


def levels_schema(names) -> LabelSchema:
    """A label schema holding background and the given level names (cranial to caudal order kept)."""
    classes = [LabelClass(0, BACKGROUND_ID, "Background", (0, 0, 0))]
    classes += [level_class(n) for n in names]
    return LabelSchema(name="levels", classes=tuple(classes), title="Spine levels (one value per level)",
                       terminology_context=TERMINOLOGY_CONTEXT)


def sort_key(name: str) -> float:
    """Cranio-caudal position of a level: a disc sits half a step below its upper vertebra."""
    value = level_value(name)
    if value >= DISC_OFFSET:
        v = value - DISC_OFFSET
        return vertebra_value("L5") + 0.8 if v == L6_VALUE else v + 0.5
    return vertebra_value("L5") + 0.6 if value == L6_VALUE else float(value)
