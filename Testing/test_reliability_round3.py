"""Reliability catalogue, round 3: the command-line, dataset, registry and format defects of a third
attack (docs/reliability.md, "Round 3"). The browser server's cases live in their own tests.

Same promises as Testing/test_reliability.py: a refusal is one line naming the problem and what to do,
the command exits non-zero, nothing is half-written, and no input is ever touched. Synthetic data and
tiny random models only (nothing here needs the shared data).
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest

from LumbarSegmentLib.cli import main
from LumbarSegmentLib.io import read_volume, write_volume
from LumbarSegmentLib.packages import PackageError, Registry, read_package
from LumbarSegmentLib.volume import Volume
from conftest import make_package
from test_reliability import everything_in, sagittal
from test_reliability_round2 import snapshot

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
    return make_package(tmp_path_factory.mktemp("rel3-pkg") / "uvd-rel3", init_filters=2, name="uvd-rel3")


def segment(*args: str, pkg=None) -> int:
    extra = ["--model", str(pkg.path)] if pkg is not None else []
    return main(["segment", *args, *extra, "--device", "cpu", "--no-progress"])


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if "error" in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def tree(folder: Path) -> dict:
    """Every file under ``folder`` (hidden ones too) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def no_inference(monkeypatch):
    """Make any inference fail loudly: a refusal must come before it."""
    import LumbarSegmentLib.engine as engine

    def boom(*a, **k):
        raise AssertionError("inference ran although the run should have been refused first")

    monkeypatch.setattr(engine, "segment_volume", boom)


# ============================================================================ 1. cohort outputs vs inputs
@pytest.mark.parametrize("flag, value", [("--report", "b.mha"), ("--report", "a.mha"), ("--report", "new.mha")])
def test_a_cohort_report_never_overwrites_an_input(flag, value, pkg, tmp_path, capsys, monkeypatch):
    no_inference(monkeypatch)
    a = write_volume(sagittal(seed=1), tmp_path / "a.mha")
    b = write_volume(sagittal(seed=2), tmp_path / "b.mha")
    before = tree(tmp_path)
    rc = segment(str(a), str(b), "-o", str(tmp_path / "out"), flag, str(tmp_path / value), pkg=pkg)
    line = one_error_line(capsys.readouterr().err)
    assert rc == 1 and "--report" in line and (".json" in line or "input" in line), line
    assert tree(tmp_path) == before and not (tmp_path / "out").exists()


def test_a_cohort_summary_named_like_an_input_json_is_refused(pkg, tmp_path, capsys, monkeypatch):
    """The summary must not be the same file as a per-case report either (two outputs, one file)."""
    no_inference(monkeypatch)
    a = write_volume(sagittal(seed=1), tmp_path / "a.mha")
    b = write_volume(sagittal(seed=2), tmp_path / "b.mha")
    out = tmp_path / "out"
    rc = segment(str(a), str(b), "-o", str(out), "--report", str(out / "a_report.json"), pkg=pkg)
    line = one_error_line(capsys.readouterr().err)
    assert rc == 1 and "both name" in line
    assert [n for n in everything_in(out) if n.endswith(".json")] == []


@pytest.mark.parametrize("name, problem", [("seg.nii.gz", "DICOM SEG"), ("seg.json", "DICOM SEG"),
                                           ("seg", "DICOM SEG")])
def test_dicom_seg_output_type_is_checked_like_the_others(name, problem, pkg, tmp_path, capsys, monkeypatch):
    from LumbarSegmentLib.dicom import write_dicom_series

    no_inference(monkeypatch)
    d = tmp_path / "series"
    write_dicom_series(sagittal(), d)
    out = tmp_path / "out"
    out.mkdir()
    rc = segment(str(d), "-o", str(out / "s.nii.gz"), "--dicom-seg", str(out / name), pkg=pkg)
    line = one_error_line(capsys.readouterr().err)
    assert rc == 1 and problem in line and ".dcm" in line, line
    assert everything_in(out) == []


@pytest.mark.parametrize("flag", ["--dicom-seg", "--preview", "--seg-nrrd", "--confidence", "-o"])
def test_cohort_output_folders_are_never_made_inside_an_input_dicom_folder(flag, pkg, tmp_path, capsys,
                                                                              monkeypatch):
    from LumbarSegmentLib.dicom import write_dicom_series

    no_inference(monkeypatch)
    cohort = tmp_path / "dcm"
    write_dicom_series(sagittal(seed=1), cohort / "s1")
    write_dicom_series(sagittal(seed=2), cohort / "s2", series_number=2)
    before = tree(cohort)
    out = tmp_path / "out"
    inside = str(cohort / "s2" / "segs")
    args = ["-o", inside] if flag == "-o" else ["-o", str(out), flag, inside]
    rc = segment(str(cohort), *args, pkg=pkg)
    line = one_error_line(capsys.readouterr().err)
    assert rc == 1 and "inside the input folder" in line, line
    assert tree(cohort) == before and not (cohort / "s2" / "segs").exists()


def test_an_empty_output_name_is_refused(pkg, tmp_path, capsys, monkeypatch):
    no_inference(monkeypatch)
    src = write_volume(sagittal(), tmp_path / "a.mha")
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    rc = segment(str(src), "-o", "", pkg=pkg)
    line = one_error_line(capsys.readouterr().err)
    assert rc == 1 and "-o/--output is empty" in line
    assert tree(tmp_path) == before


def test_series_on_a_volume_file_is_refused_not_ignored(pkg, tmp_path, capsys, monkeypatch):
    no_inference(monkeypatch)
    src = write_volume(sagittal(), tmp_path / "a.mha")
    rc = segment(str(src), "-o", str(tmp_path / "s.nii.gz"), "--series", "1.2.3", pkg=pkg)
    line = one_error_line(capsys.readouterr().err)
    assert rc == 1 and "--series" in line and "volume file" in line
    assert not (tmp_path / "s.nii.gz").exists()


def test_an_output_name_too_long_for_its_temporary_is_refused_before_inference(pkg, tmp_path, capsys,
                                                                                 monkeypatch):
    no_inference(monkeypatch)
    src = write_volume(sagittal(), tmp_path / "a.mha")
    name = "x" * 240 + ".nii.gz"  # 247 characters: legal, but its hidden temporary name is not
    rc = segment(str(src), "-o", str(tmp_path / name), pkg=pkg)
    line = one_error_line(capsys.readouterr().err)
    assert rc == 1 and "characters long" in line and "shorter name" in line and "a.mha" not in line, line
    assert everything_in(tmp_path) == ["a.mha"]


def test_replacing_an_existing_cohort_output_is_said(pkg, tmp_path, capsys):
    e2 = tmp_path / "e2"
    e2.mkdir()
    src = write_volume(sagittal(), e2 / "a.mha")
    (e2 / "a_seg.nii.gz").write_bytes(b"an earlier result")
    rc = segment(str(src), "-o", str(e2), pkg=pkg)
    err = capsys.readouterr().err
    assert rc == 0 and "will be replaced" in err and "a_seg.nii.gz" in err, err
    assert read_volume(e2 / "a_seg.nii.gz").array.dtype == np.uint8


@pytest.mark.parametrize("value", ["1025", "0", "-2", "nan"])
def test_thread_counts_state_their_limit(value, pkg, tmp_path, capsys):
    src = write_volume(sagittal(), tmp_path / "a.mha")
    with pytest.raises(SystemExit) as e:
        segment(str(src), "-o", str(tmp_path / "s.nii.gz"), "--threads", value, pkg=pkg)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "1-1024" in err and "Traceback" not in err, err
