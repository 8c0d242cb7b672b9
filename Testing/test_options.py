"""The segment options contract (``LumbarSegmentLib/inference/options.py``): one set of flags, ranges and
messages for the command line, the engine, the Slicer panel and the browser page.

* round trip: for random valid options, the command line's own parser reading ``to_argv()`` gives the
  same options back (``from_namespace``), so a draft started from Slicer or the browser runs exactly
  what was asked;
* one range: every text the command line accepts is a value ``validate`` accepts and the other way
  round, with the same advice in both refusals and in ``--help`` (``--overlap 0.92`` used to pass
  argparse, whose help said "below 0.95", and then be refused with "from 0 to 0.9").
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from LumbarSegmentLib.cli.main import build_parser, main
from LumbarSegmentLib.inference.options import Option, OptionError, SegmentOptions

OPTIONS = SegmentOptions.options()
ROOT = Path(__file__).resolve().parents[1]


def _parse(argv: list[str]):
    return build_parser().parse_args(["segment", "in.nii.gz", "-o", "out.nii.gz", *argv])


def _segment_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["segment"]


def _value(o: Option):
    """Any value the option takes (the strategy is written from the spec, not from the checks)."""
    if o.switch:
        return st.booleans()
    parts = [st.sampled_from(o.choices)] if o.choices else []
    if o.pattern:
        parts.append(st.integers(0, 15).map(lambda n: f"cuda:{n}"))
    if o.kind is int and o.lo is not None:
        parts.append(st.integers(int(o.lo), int(o.hi)))
    elif o.kind is float:
        parts.append(st.floats(o.lo, o.hi, allow_nan=False))
    if o.automatic:
        parts.append(st.none())
    return st.one_of(parts)


valid_options = st.fixed_dictionaries({name: _value(o) for name, o in OPTIONS.items()}).map(
    lambda d: SegmentOptions(**d))


@settings(max_examples=60, deadline=None)
@given(valid_options)
def test_the_command_line_reads_back_exactly_the_options_to_argv_wrote(options):
    options.validate()
    argv = options.to_argv()
    assert SegmentOptions.from_namespace(_parse(argv)) == options
    flags = [a for a in argv if a.startswith("--")]
    assert len(flags) == len(set(flags)) and all(f in {o.flag for o in OPTIONS.values()} for f in flags)


def test_defaults_give_no_flag_and_every_flag_is_registered():
    assert SegmentOptions().to_argv() == []
    assert SegmentOptions.from_namespace(_parse([])) == SegmentOptions()
    registered = {s for a in _segment_parser()._actions for s in a.option_strings}
    assert {o.flag for o in OPTIONS.values()} <= registered


def _argparse_verdict(flag: str, text: str, capsys) -> tuple[bool, str]:
    try:
        _parse([f"{flag}={text}"])  # "=": a text that starts with "--" is still the flag's value
    except SystemExit as exc:
        assert exc.code == 2
        return False, capsys.readouterr().err
    return True, ""


def _validate_verdict(name: str, o: Option, text: str) -> tuple[bool, str]:
    try:
        value = o.kind(text) if o.kind is not str and text not in o.choices else text
    except ValueError:
        value = text
    try:
        SegmentOptions(**{name: value}).validate()
    except OptionError as exc:
        return False, str(exc)
    return True, ""


def _probes(o: Option) -> list[str]:
    """Texts at and just beyond every edge of the range, plus junk."""
    texts = ["", "abc", "nan", "inf", "-inf", "1e400", "--model=x", *o.choices, "cuda:1", "cuda:x"]
    if o.lo is not None:
        for edge in (o.lo, o.hi):
            for d in (-1, -0.5, -1e-9, 0, 1e-9, 0.5, 1):
                texts += [repr(edge + d), str(int(edge + d)) if math.isfinite(edge + d) else "0"]
        texts += [repr((o.lo + o.hi) / 2), "0.92", "2.5", "-0", "100000"]
    return texts


@pytest.mark.parametrize("name", [n for n, o in OPTIONS.items() if not o.switch])
def test_argparse_and_validate_accept_and_refuse_the_same_values_with_the_same_advice(name, capsys):
    o = OPTIONS[name]
    for text in _probes(o):
        by_parser, parser_says = _argparse_verdict(o.flag, text, capsys)
        by_validate, validate_says = _validate_verdict(name, o, text)
        assert by_parser == by_validate, (o.flag, text)
        if not by_parser:
            assert o.flag in parser_says and o.advice in parser_says, parser_says
            assert validate_says.startswith(f"{o.flag} ") and validate_says.endswith(o.advice), validate_says


@settings(max_examples=80, deadline=None)
@given(st.sampled_from([n for n, o in OPTIONS.items() if o.lo is not None]), st.floats(-3000, 3000))
def test_random_numbers_get_the_same_verdict_from_both(name, x):
    o = OPTIONS[name]
    text = repr(x) if o.kind is float else str(int(x))
    try:
        by_parser = SegmentOptions.from_namespace(_parse([f"{o.flag}={text}"])) is not None
    except SystemExit:
        by_parser = False
    assert by_parser == _validate_verdict(name, o, text)[0]


def test_the_issue_case_overlap_0_92_is_refused_by_both_with_the_range_the_help_states(capsys):
    with pytest.raises(SystemExit):
        _parse(["--overlap", "0.92"])
    err = capsys.readouterr().err
    with pytest.raises(OptionError) as exc:
        SegmentOptions(overlap=0.92).validate()
    assert str(exc.value) == "--overlap 0.92: use a fraction from 0 to 0.9"
    assert "argument --overlap: '0.92': use a fraction from 0 to 0.9" in err
    helped = "".join(_segment_parser().format_help().split())  # (wrapped lines may split "32-2048")
    for o in OPTIONS.values():
        if o.lo is not None:
            assert "".join(o.advice.split()) in helped, o.flag  # the range in the help is the one checked
    SegmentOptions(overlap=0.9).validate()  # the edge itself is allowed, by both
    assert _parse(["--overlap", "0.9"]).overlap == 0.9


def test_the_command_refuses_an_out_of_range_tile_before_reading_anything(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["segment", str(tmp_path / "missing.nii.gz"), "-o", str(tmp_path / "o.nii.gz"), "--tile", "4096"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--tile" in err and "32-2048 pixels" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_caller_built_namespace_is_checked_too():
    """The worker and tests may hand cmd_segment a Namespace argparse never saw: from_namespace validates."""
    ns = _parse([])
    ns.overlap = 0.95
    with pytest.raises(OptionError, match="--overlap 0.95: use a fraction from 0 to 0.9"):
        SegmentOptions.from_namespace(ns)
    ns.overlap, ns.device = 0.5, "cuda:3"  # a torchrun rank's device
    assert SegmentOptions.from_namespace(ns).device == "cuda:3"


def test_validate_refuses_wrong_types_and_fields_without_a_flag():
    for bad, says in (({"overlap": "abc"}, "--overlap 'abc'"), ({"tile": True}, "--tile True"),
                      ({"tile": 256.0}, "--tile 256.0"), ({"batch_size": 2.5}, "--batch-size 2.5"),
                      ({"threads": 0}, "--threads 0: use 1-1024"), ({"device": "cuda:"}, "--device 'cuda:'"),
                      ({"allow_reslice": "yes"}, "--reslice 'yes'"), ({"chunk_slices": 0}, "chunk_slices 0"),
                      ({"confidence": 1}, "confidence 1")):
        with pytest.raises(OptionError, match=f"^{says}"):
            SegmentOptions(**bad).validate()
    with pytest.raises(OptionError):  # an OptionError is a ValueError and an EngineError
        raise OptionError("x")
    assert issubclass(OptionError, ValueError)


def test_form_values_are_read_like_flags():
    opts = SegmentOptions.from_values(tile="256", overlap="0.5", bn_adapt=0.25, batch_size="", precision="fp32",
                                      slice_smoothing_mm="0")
    assert (opts.tile, opts.overlap, opts.bn_adapt, opts.batch_size, opts.slice_smoothing_mm) == (256, 0.5, 0.25, None,
                                                                                                   0.0)
    assert SegmentOptions.from_values(tile=" whole ").tile == "whole"
    with pytest.raises(OptionError, match="--tile 'big': use auto, patch, whole or a window size of 32-2048 pixels"):
        SegmentOptions.from_values(tile="big")
    with pytest.raises(OptionError, match="unknown segment option"):
        SegmentOptions.from_values(registry="/elsewhere")


def test_options_are_frozen_and_the_engine_uses_the_same_class():
    from dataclasses import FrozenInstanceError

    from LumbarSegmentLib.inference import engine

    assert engine.SegmentOptions is SegmentOptions
    with pytest.raises(FrozenInstanceError):
        SegmentOptions().overlap = 0.5


def test_only_the_command_line_turns_a_namespace_into_options():
    """The argparse Namespace stops at cli/: no module below it reads one into options."""
    lib = ROOT / "LumbarSegmentLib"
    callers = sorted(str(p.relative_to(lib)) for p in lib.rglob("*.py")
                     if "from_namespace(" in p.read_text() and p.parent.name != "cli" and p.name != "options.py")
    assert callers == []
    assert "check_options" not in (lib / "core" / "checks.py").read_text()
