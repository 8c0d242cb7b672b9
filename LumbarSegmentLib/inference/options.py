"""The segment options: one contract from a front end's widget (or a command's flag) to the engine.

:class:`SegmentOptions` is a frozen dataclass. Each field that a user may set carries, in its
metadata, an :class:`Option`: its ``lumbarseg segment`` flag, help text, default (the field's),
and its choices or range. Everything that reads or writes options goes through that one entry:

* :meth:`SegmentOptions.validate` refuses a value outside it, in one message style that names the
  flag and says what to give (``--overlap 0.92: use a fraction from 0 to 0.9``);
* :meth:`SegmentOptions.add_arguments` registers every flag on an argparse parser, with a ``type``
  that converts the text and then applies the very same check (so argparse and ``validate``
  accept and refuse exactly the same values, and the help states the same range);
* :meth:`SegmentOptions.from_namespace` is the only place where an argparse ``Namespace``
  becomes options (the command line's edge; nothing below it sees a Namespace);
* :meth:`SegmentOptions.from_values` builds options from a form (the Slicer panel, the browser
  page): numbers, or their text as typed, each read through its flag's own conversion;
* :meth:`SegmentOptions.to_argv` gives the flags for a child ``lumbarseg segment`` process (the
  Slicer and browser drafts), only those whose value differs from the default.

Two fields have no flag: ``confidence`` (the command names the confidence map's file with
``--confidence PATH``; the command line sets this field from that) and ``chunk_slices`` (a
memory bound for library callers). ``to_argv`` leaves them out.
"""
from __future__ import annotations

import argparse
import math
import numbers
import re
from dataclasses import dataclass, field, fields

from LumbarSegmentLib.inference.bn_adapt import MAX_ADAPT_SLICES
from LumbarSegmentLib.inference.devices import DEVICES, PRECISIONS, EngineError
from LumbarSegmentLib.inference.onnx_runner import RUNTIMES
from LumbarSegmentLib.inference.postprocess import MODES as POSTPROCESS_MODES
from LumbarSegmentLib.inference.slice_smoothing import SLICE_SMOOTHING_MAX_MM, SLICE_SMOOTHING_MM

MODES = ("fast", "tta", "ensemble")
TILE_WORDS = ("auto", "patch", "whole")
TILE_PIXELS = (32, 2048)
OVERLAP_MAX = 0.9  # 0.9 already runs 10 x 10 windows where 0 runs one; beyond it the run only gets slower
MAX_THREADS = 1024
MAX_BATCH = 1024
OPTION = "option"  # the metadata key of a field's Option


class OptionError(EngineError, ValueError):
    """An option's value is outside its choices or range (the message names the flag and what to give)."""


@dataclass(frozen=True)
class Option:
    """What a user may give for one field: its flag, its help, and its choices or range.

    ``kind`` is the value's type (``str``, ``int`` or ``float``). A ``str`` option takes one of
    ``choices`` (or text matching ``pattern``); a number lies in ``lo`` .. ``hi`` (both included),
    and may also be one of the words in ``choices`` (``--tile auto``).
    ``automatic``: ``None`` is allowed too (the flag left out: the engine chooses). ``switch``: a
    bare flag that sets ``True``. ``use`` says what to give, in every message and in the help.
    """

    flag: str
    help: str
    kind: type = str
    choices: tuple = ()
    lo: float | None = None
    hi: float | None = None
    pattern: str | None = None
    automatic: bool = False
    switch: bool = False
    use: str = ""
    metavar: str | None = None

    @property
    def dest(self) -> str:
        """The Namespace attribute argparse gives the flag (``--slice-smoothing`` -> ``slice_smoothing``)."""
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def advice(self) -> str:
        return self.use or f"choose one of {', '.join(map(str, self.choices))}"

    def accepts(self, value) -> bool:
        """The one range check: ``validate`` and the argparse type both end here."""
        if self.switch:
            return isinstance(value, bool)
        if value is None:
            return self.automatic
        if isinstance(value, str) and value in self.choices:
            return True
        if self.kind is str:
            return isinstance(value, str) and self.pattern is not None and re.fullmatch(self.pattern, value) is not None
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or self.lo is None:
            return False
        if self.kind is int and not isinstance(value, numbers.Integral):
            return False
        v = float(value)
        return math.isfinite(v) and self.lo <= v <= self.hi

    def check(self, value) -> None:
        if not self.accepts(value):
            raise OptionError(f"{self.flag} {_shown(value)}: {self.advice}")

    def parse(self, text: str):
        """Text as typed (a command line, a form) -> the value, or a ``ValueError`` saying what to give."""
        text = str(text).strip()
        value = text
        if self.kind is not str and text not in self.choices:
            try:
                value = self.kind(text)
            except ValueError:
                value = text  # refused just below, with the flag's own advice
        if not self.accepts(value):
            raise ValueError(f"{text!r}: {self.advice}")
        return value

    def argparse_type(self):
        """An argparse ``type`` for the flag: :meth:`parse`, its refusal a usage message."""

        def convert(text: str):
            try:
                return self.parse(text)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None

        convert.__name__ = self.dest  # argparse names the type in some messages
        return convert

    def argv(self, value) -> list[str]:
        if self.switch:
            return [self.flag] if value else []
        return [] if value is None else [self.flag, str(value)]

    def shown_metavar(self) -> str:
        if self.metavar:
            return self.metavar
        return "{" + ",".join(self.choices) + "}"


def _shown(value) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def _opt(default, option: Option):
    return field(default=default, metadata={OPTION: option})


@dataclass(frozen=True)
class SegmentOptions:
    """How to segment: device, mode, windows, precision, smoothing, adaptation, post-processing.

    Every field with a flag is settable from ``lumbarseg segment``, the Slicer panel and the
    browser page, with the same choices and ranges (the module doc says how).
    """

    device: str = _opt("auto", Option(
        "--device", "where to run: auto = CUDA GPU, else Apple MPS, else CPU; cuda:N = GPU N (under torchrun "
        "each rank takes cuda:LOCAL_RANK)", choices=DEVICES, pattern=r"cuda:\d+",
        use=f"choose one of {', '.join(DEVICES)} or cuda:N", metavar="{" + ",".join(DEVICES) + ",cuda:N}"))
    mode: str = _opt("fast", Option(
        "--mode", "fast: one model, one pass; tta: also the anterior-posterior flip (2 forwards per window); "
        "ensemble: each model x 2 flips (4 forwards per window with two models)", choices=MODES,
        use=f"unknown mode; choose one of {', '.join(MODES)}"))
    postprocess: str = _opt("none", Option(
        "--postprocess", "clean-up: spine = drop foreground blobs that are not connected to the spinal column "
        "(on the validation cases it changed Dice by less than 0.001 and removed stray blobs outside the spine)",
        choices=POSTPROCESS_MODES, use=f"unknown post-processing; choose one of {', '.join(POSTPROCESS_MODES)}"))
    bn_adapt: float = _opt(0.0, Option(
        "--bn-adapt", "re-estimate the model's BatchNorm statistics on this volume before segmenting it: the "
        "weight of the volume's statistics, 0 = off; one extra pass over up to "
        f"{MAX_ADAPT_SLICES} slices (the validation page of the documentation has what it changes)", kind=float,
        lo=0, hi=1, use="use 0 (off) to 1 (the volume's statistics alone)", metavar="W"))
    slice_smoothing_mm: float = _opt(SLICE_SMOOTHING_MM, Option(
        "--slice-smoothing", "sigma in mm of the Gaussian average of probabilities across neighbouring slices "
        "(0 = each slice on its own)", kind=float, lo=0, hi=SLICE_SMOOTHING_MAX_MM,
        use=f"use 0 (off) to {SLICE_SMOOTHING_MAX_MM:g} mm", metavar="MM"))
    precision: str = _opt("auto", Option(
        "--precision", "arithmetic: auto = fp16/bf16 on CUDA, bf16 on CPUs with native bf16, else fp32 (for "
        "PyTorch and OpenVINO alike; ONNX Runtime: fp32); fp32 = the reference (a few hundred voxels differ from "
        "bf16); int8 = a quantised network, about "
        "twice as fast on most CPUs without bf16 (not on first-generation AMD Zen), computed by OpenVINO: runtime auto "
        "or openvino)",
        choices=PRECISIONS, use=f"unknown precision; choose one of {', '.join(PRECISIONS)}"))
    runtime: str = _opt("auto", Option(
        "--runtime", "what computes the network: torch (PyTorch), onnx (ONNX Runtime, CPU float32; needs the "
        "onnxruntime package), openvino (OpenVINO, CPU; float32, bf16 or int8 as --precision says; needs the openvino "
        "package), auto = OpenVINO where no GPU is present and OpenVINO and onnx are installed (no PyTorch import, "
        "faster), "
        "else torch (docs/benchmarks.md compares them)", choices=RUNTIMES,
        use=f"unknown runtime; choose one of {', '.join(RUNTIMES)}"))
    batch_size: int | None = _opt(None, Option(
        "--batch-size", "windows per forward pass (default: 32 on CUDA, halved on out-of-memory; on a CPU as many "
        "as hold 4 x 320 x 320 pixels)", kind=int, lo=1, hi=MAX_BATCH, automatic=True,
        use=f"use a whole number from 1 to {MAX_BATCH} (or leave it out: automatic)", metavar="N"))
    # "auto": the whole slice in one window when no side exceeds twice the model's patch (the nets
    # are fully convolutional), else sliding windows of the patch size; "patch", "whole", or pixels.
    tile: str | int = _opt("auto", Option(
        "--tile", "inference window: auto = the whole slice when it fits in twice the model's patch, else sliding "
        "windows of the patch size (patch); whole = always the whole slice; PIXELS = square windows of that size",
        kind=int, choices=TILE_WORDS, lo=TILE_PIXELS[0],
        hi=TILE_PIXELS[1], use=f"use auto, patch, whole or a window size of {TILE_PIXELS[0]}-{TILE_PIXELS[1]} "
        "pixels", metavar="auto|patch|whole|PIXELS"))
    overlap: float = _opt(0.25, Option(
        "--overlap", "fraction of a sliding window shared with its neighbour", kind=float, lo=0, hi=OVERLAP_MAX,
        use=f"use a fraction from 0 to {OVERLAP_MAX:g}", metavar="F"))
    threads: int | None = _opt(None, Option(
        "--threads", "CPU threads for PyTorch (default: PyTorch's; under torchrun the node's cores split between "
        "its ranks)", kind=int, lo=1, hi=MAX_THREADS, automatic=True,
        use=f"use 1-{MAX_THREADS} CPU threads", metavar="N"))
    roi: bool = _opt(False, Option(
        "--roi", "segment only a box around the spine found on three scout slices (48 mm around it): about half "
        "the network's work on a wide field of view, a small lossy step (docs/benchmarks.md)", switch=True,
        use="on or off"))
    slice_step: int = _opt(1, Option(
        "--slice-step", "on stacks of thin slices (at most 1.5 mm apart), run the network on every Nth slice and "
        "blend the slices between from their neighbours, computing them after all where the neighbours disagree: "
        "about N times less network work on 1 mm volumes, a small lossy step (docs/benchmarks.md); 1 = every slice",
        kind=int, lo=1, hi=4, use="use 1 (every slice) to 4", metavar="N"))
    allow_reslice: bool = _opt(False, Option(
        "--reslice", "accept axial/coronal stacks (cut sagittal slices)", switch=True, use="on or off"))
    confidence: bool = False  # also return the per-voxel max probability (the command: --confidence PATH)
    chunk_slices: int = 16  # slices processed together (bounds memory for huge volumes)

    # ------------------------------------------------------------------ the contract
    @classmethod
    def options(cls) -> dict[str, Option]:
        """``field name -> Option`` for every field a user may set, in the order of the help."""
        return {f.name: f.metadata[OPTION] for f in fields(cls) if OPTION in f.metadata}

    @classmethod
    def default(cls, name: str):
        return next(f.default for f in fields(cls) if f.name == name)

    def validate(self) -> "SegmentOptions":
        """Refuse a value outside its choices or range (:class:`OptionError`); returns ``self``."""
        for name, option in self.options().items():
            option.check(getattr(self, name))
        if not isinstance(self.confidence, bool):
            raise OptionError(f"confidence {_shown(self.confidence)}: use True or False")
        if isinstance(self.chunk_slices, bool) or not isinstance(self.chunk_slices, numbers.Integral) \
                or self.chunk_slices < 1:
            raise OptionError(f"chunk_slices {_shown(self.chunk_slices)}: use a whole number of at least 1")
        return self

    @classmethod
    def add_arguments(cls, parser, only: tuple[str, ...] | None = None) -> None:
        """Register every option's flag (or those of the fields named in ``only``) on an argparse
        ``parser``; the defaults are the fields', the help ends with the range."""
        for name, o in cls.options().items():
            if only is not None and name not in only:
                continue
            if o.switch:
                parser.add_argument(o.flag, action="store_true", help=o.help)
                continue
            default = cls.default(name)
            shown = o.help if o.lo is None else f"{o.help}; {o.use}"
            if default is not None and "default" not in shown:
                shown += f" (default: {default})"
            parser.add_argument(o.flag, type=o.argparse_type(), default=default, metavar=o.shown_metavar(), help=shown)

    @classmethod
    def from_namespace(cls, ns, **fixed) -> "SegmentOptions":
        """The parsed command line -> validated options (a flag the parser lacks keeps its default).

        ``fixed`` sets fields that no flag carries (``confidence``, ``chunk_slices``)."""
        given = {name: getattr(ns, o.dest) for name, o in cls.options().items() if hasattr(ns, o.dest)}
        return cls(**given, **fixed).validate()

    @classmethod
    def from_values(cls, **values) -> "SegmentOptions":
        """A form's values -> validated options: a number as it is, text as typed (``"0.5"``, ``"256"``)
        read through its flag's conversion; an empty text or ``None`` for an automatic option: automatic."""
        known = cls.options()
        unknown = sorted(set(values) - set(known) - {"confidence", "chunk_slices"})
        if unknown:
            raise OptionError(f"unknown segment option(s): {', '.join(unknown)}")
        out = {}
        for name, value in values.items():
            o = known.get(name)
            if o is not None and isinstance(value, str) and not o.switch:
                if o.automatic and not value.strip():
                    value = None
                else:
                    try:
                        value = o.parse(value)
                    except ValueError as exc:
                        raise OptionError(f"{o.flag} {exc}") from None
            out[name] = value
        return cls(**out).validate()

    def to_argv(self) -> list[str]:
        """The flags of a ``lumbarseg segment`` command that reproduce these options (non-defaults only)."""
        argv: list[str] = []
        for name, o in self.options().items():
            value = getattr(self, name)
            if value != self.default(name):
                argv += o.argv(value)
        return argv


__all__ = ["MODES", "OVERLAP_MAX", "TILE_PIXELS", "TILE_WORDS", "Option", "OptionError", "SegmentOptions"]
