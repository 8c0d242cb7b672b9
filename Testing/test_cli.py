"""`lumbarseg` end to end on real data with a model package: outputs, report, atomicity, exit codes."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from LumbarSegmentLib.cli.main import main
from LumbarSegmentLib.formats.io import read_volume, write_volume


@pytest.fixture()
def small_case(tmp_path, small_real_volume):
    p = tmp_path / "in" / "case.nrrd"
    p.parent.mkdir()
    write_volume(small_real_volume, p)
    return p


def test_segment_writes_all_outputs_in_input_geometry(small_case, tiny_package, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    rc = main(["segment", str(small_case), "-o", str(out / "lab.nii.gz"), "--model", str(tiny_package.path),
               "--report", str(out / "r.json"), "--preview", str(out / "p.png"),
               "--confidence", str(out / "c.nii.gz"), "--no-progress"])
    assert rc == 0
    lab, src = read_volume(out / "lab.nii.gz"), read_volume(small_case)
    assert lab.same_geometry(src) and lab.array.dtype == np.uint8
    rep = json.loads((out / "r.json").read_text())
    assert rep["labels"]["1"] == "vertebral_body" and rep["models"][0]["sha256"] == tiny_package.sha256
    assert rep["device"] == "cpu" and "read" in rep["timings_s"] and "inference" in rep["timings_s"]
    assert (out / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_volume(out / "c.nii.gz").same_geometry(src)
    assert sorted(p.name for p in out.iterdir()) == ["c.nii.gz", "lab.nii.gz", "p.png", "r.json"]


def test_failure_writes_nothing(small_case, tiny_package, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    # the preview folder does not exist: the whole case fails, and the label map is not left behind either
    rc = main(["segment", str(small_case), "-o", str(out / "lab.nii.gz"), "--model", str(tiny_package.path),
               "--preview", str(tmp_path / "missing" / "p.png"), "--no-progress"])
    assert rc == 1 and "error" in capsys.readouterr().err
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("args,msg", [
    (["segment", "/no/such.nii.gz", "-o", "x.nii.gz"], "no such file"),
    (["segment", "{case}", "-o", "{out}/x.txt"], "nii.gz"),
    (["segment", "{case}", "-o", "{out}/x.nii.gz", "--model", "no-such-model"], "cannot find model"),
])
def test_clear_errors_and_nonzero_exit(args, msg, small_case, tiny_package, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LUMBARSEG_HOME", str(tmp_path / "home"))
    args = [a.format(case=small_case, out=tmp_path) for a in args]
    if "--model" not in args:
        args += ["--model", str(tiny_package.path)]
    assert main(args + ["--no-progress"]) == 1
    assert msg in capsys.readouterr().err


def test_cohort_folder(tmp_path, small_real_volume, tiny_package, capsys):
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    write_volume(small_real_volume, cohort / "a.nii.gz")
    write_volume(small_real_volume, cohort / "b.mha")
    (cohort / "broken.nrrd").write_bytes(b"NRRD0004\nnot really")
    rc = main(["segment", str(cohort), "-o", str(tmp_path / "res"), "--model", str(tiny_package.path),
               "--seg-nrrd", "", "--no-progress"])
    assert rc == 1  # one broken input: reported, the others still done
    names = sorted(p.name for p in (tmp_path / "res").iterdir())
    assert "a_seg.nii.gz" in names and "b_seg.nii.gz" in names and "a.seg.nrrd" in names
    assert not any(n.startswith("broken") for n in names)
    assert "broken.nrrd" in capsys.readouterr().err


def test_models_lists_registries(tmp_path, tiny_package, monkeypatch, capsys):
    from LumbarSegmentLib.registry.packages import Registry

    monkeypatch.setenv("LUMBARSEG_HOME", str(tmp_path / "home"))
    Registry(tmp_path / "home" / "models").publish(tiny_package, make_default=True)
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    mine = [r for r in rows if r["registry"] == str(tmp_path / "home" / "models")]
    assert mine and mine[0]["ref"] == "uvd-tiny@1" and mine[0]["default"]


def test_console_script_runs():
    r = subprocess.run([sys.executable, "-m", "LumbarSegmentLib.cli.main", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "segment" in r.stdout
