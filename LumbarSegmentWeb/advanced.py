"""The page's "Advanced" segment settings: which ``SegmentOptions`` a browser user may set, and how.

The annotator may change precision, across-slice smoothing, BatchNorm adaptation, post-processing,
the inference window (tile), its overlap, the runtime (e.g. OpenVINO, in bf16 or int8 when asked for with
the precision), whether only a box around the spine is segmented (``--roi``) and the slice step on thin
slices (``--slice-step``); the device and CPU
threads stay the server's (``lumbarseg web --device/--threads``). Every value goes through the Lib's options contract
(``LumbarSegmentLib.inference.options``): the same choices, ranges, defaults, help and refusal
messages as ``lumbarseg segment``'s flags, and the draft's command line is built from it.
"""
from __future__ import annotations

from LumbarSegmentLib.inference.options import OptionError, SegmentOptions
from LumbarSegmentLib.slicer.segment_job import SegmentRequest

FIELDS = ("precision", "slice_smoothing_mm", "bn_adapt", "postprocess", "tile", "overlap", "runtime", "roi",
          "slice_step")
LABELS = {"precision": "Precision", "slice_smoothing_mm": "Slice smoothing (mm)", "bn_adapt": "BN adaptation",
          "postprocess": "Post-processing", "tile": "Tile", "overlap": "Overlap", "runtime": "Runtime",
          "roi": "Only a box around the spine", "slice_step": "Slice step (thin slices)"}
STATE_PREFIX = "adv_"


def state_key(name: str) -> str:
    return STATE_PREFIX + name


def initial_state() -> dict:
    """The page's state keys for the settings, at the options' defaults."""
    return {state_key(n): SegmentOptions.default(n) for n in FIELDS}


def values_from_state(state) -> dict:
    """The settings as the page holds them (numbers, or text as typed), by option name."""
    return {n: state[state_key(n)] for n in FIELDS}


def advanced_args() -> str:
    """The Segment button's argument: the settings as the page shows them at the click, sent with the click
    itself, so a value typed just before it cannot lose the race with the page's state sync."""
    return "[{" + ", ".join(f"{n}: {state_key(n)}" for n in FIELDS) + "}]"


def widgets() -> list[dict]:
    """One row per setting for the page: how to draw it, from the option's own spec."""
    rows = []
    for name in FIELDS:
        o = SegmentOptions.options()[name]
        row = {"name": name, "key": state_key(name), "label": LABELS[name], "help": o.help, "hint": o.advice}
        if o.switch:  # on or off
            row.update(widget="switch")
        elif o.lo is None:
            row.update(widget="select", items=list(o.choices))
        elif o.choices:  # words or a number: the tile
            row.update(widget="combobox", items=list(o.choices))
        else:
            step = 1 if o.kind is int else 0.05 if o.hi <= 1 else 0.5
            row.update(widget="number", min=o.lo, max=o.hi, step=step)
        rows.append(row)
    return rows


def segment_request(model: str | None, mode: str, levels: bool, advanced: dict | None, *, device: str,
                    threads: int | None) -> SegmentRequest:
    """The draft's request: the page's choices checked by the options contract (``OptionError`` if not)."""
    if advanced is not None and not isinstance(advanced, dict):
        raise OptionError("the segment settings must be a mapping of setting names to values")
    advanced = dict(advanced or {})
    extra = sorted(set(advanced) - set(FIELDS))
    if extra:  # e.g. a crafted message naming the device: that is the server's to choose
        raise OptionError(f"not a setting of this page: {', '.join(map(str, extra))}")
    return SegmentRequest.of(models=[model] if model else None, levels=levels, mode=mode, device=device,
                             threads=threads, **advanced)
