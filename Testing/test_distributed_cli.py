"""Cohorts: what counts as one, where its outputs go, and two torchrun processes (gloo, CPU) that
share it so that each case is written exactly once and rank 0 writes the summary.

Volumes are real: the held-out sample case, stored as sagittal images and cropped to a few slices.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from LumbarSegmentLib.cli.main import main
from LumbarSegmentLib.cli.cohort import CohortError, check_unique_stems, expand_inputs
from LumbarSegmentLib.core.distributed import Rank, current_rank, shard
from LumbarSegmentLib.formats.io import read_volume, write_volume

from test_dicom_seg import sagittal_sample, write_sample_series

ROOT = Path(__file__).resolve().parents[1]


def test_shards_cover_every_case_once():
    cases = [f"c{i}" for i in range(11)]
    parts = [shard(cases, Rank(r, 3)) for r in range(3)]
    assert sorted(sum(parts, [])) == sorted(cases) and [len(p) for p in parts] == [4, 4, 3]


def test_rank_comes_from_torchrun_variables():
    me = current_rank({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (me.rank, me.world, me.local_rank, me.local_world, me.distributed) == (3, 4, 1, 2, True)
    assert not current_rank({}).distributed
    with pytest.raises(ValueError, match="inconsistent"):
        current_rank({"RANK": "4", "WORLD_SIZE": "4"})


def test_folder_of_dicom_series_folders_is_a_cohort(tmp_path):
    for name in ("p1", "p2"):
        write_sample_series(tmp_path / "study" / name, slices=2)
    write_volume(sagittal_sample(slices=2), tmp_path / "study" / "p3.nii.gz")
    (tmp_path / "study" / "notes").mkdir()  # no DICOM inside: not a case
    assert [p.name for p in expand_inputs([str(tmp_path / "study")])] == ["p3.nii.gz", "p1", "p2"]
    # a series folder itself stays one case; --series / a label-file output keep the parent as one study
    assert expand_inputs([str(tmp_path / "study" / "p1")]) == [tmp_path / "study" / "p1"]
    assert expand_inputs([str(tmp_path / "study")], series_folders=False) == [tmp_path / "study" / "p3.nii.gz"]
    (tmp_path / "study" / "p3.nii.gz").unlink()
    assert expand_inputs([str(tmp_path / "study")], series_folders=False) == [tmp_path / "study"]


def test_clashing_output_names_are_refused(tmp_path):
    with pytest.raises(CohortError, match="would both write a_seg"):
        check_unique_stems([tmp_path / "x" / "a.nii.gz", tmp_path / "y" / "a.mha"])


def test_cohort_option_values_are_folders_and_dicom_seg_only_for_dicom(tmp_path, tiny_package, capsys):
    cohort = tmp_path / "cohort"
    write_sample_series(cohort / "dcm_case", slices=2)
    write_volume(sagittal_sample(slices=2), cohort / "vol_case.nii.gz")
    out = tmp_path / "out"
    rc = main(["segment", str(cohort), "-o", str(out), "--model", str(tiny_package.path), "--no-progress",
               "--seg-nrrd", "--preview", str(tmp_path / "png"), "--dicom-seg", "--report"])
    err = capsys.readouterr().err
    assert rc == 1 and "vol_case.nii.gz" in err and "--dicom-seg needs a DICOM series folder" in err
    assert sorted(p.name for p in out.iterdir()) == ["dcm_case.seg.nrrd", "dcm_case_report.json", "dcm_case_seg.dcm",
                                                    "dcm_case_seg.nii.gz", "summary.json"]
    assert [p.name for p in (tmp_path / "png").iterdir()] == ["dcm_case_preview.png"]
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["cases"], summary["succeeded"], summary["failed"]) == (2, 1, 1)


def test_bad_option_values_are_usage_errors(capsys):
    for bad, says in ((["--tile", "abc"], "use auto, patch, whole or a window size"),
                      (["--overlap", "1.5"], "use a fraction from 0 to 0.9"), (["--batch-size", "0"], "use a whole number from 1 to 1024"),
                      (["--slice-smoothing", "-2"], "use 0 (off) to 50 mm")):
        with pytest.raises(SystemExit) as e:
            main(["segment", "x.nii.gz", "-o", "y.nii.gz", *bad])
        assert e.value.code == 2 and says in capsys.readouterr().err


def test_single_input_needs_file_names_for_optional_outputs(tmp_path, tiny_package, capsys):
    src = tmp_path / "a.nii.gz"
    write_volume(sagittal_sample(slices=2), src)
    rc = main(["segment", str(src), "-o", str(tmp_path / "a_seg.nii.gz"), "--model", str(tiny_package.path),
               "--preview", "--no-progress"])
    assert rc == 1 and "--preview needs a file name when segmenting one input" in capsys.readouterr().err


@pytest.mark.slow
def test_two_torchrun_processes_split_a_cohort(tmp_path, tiny_package):
    """2 ranks on CPU (gloo): every case written once, by one rank; rank 0's summary lists all (~15 s)."""
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    vol = sagittal_sample(slices=2)
    names = [f"case{i}" for i in range(5)]
    for n in names:
        write_volume(vol, cohort / f"{n}.nii.gz")
    # sorted, the inputs are broken, case0, case1, case1b, ...: one broken case on each rank
    (cohort / "broken.nii.gz").write_bytes(b"not an image")
    (cohort / "case1b.nii.gz").write_bytes(b"not an image either")
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                        "--nproc-per-node", "2", "-m", "LumbarSegmentLib.cli.main", "segment", str(cohort), "-o", str(out),
                        "--model", str(tiny_package.path), "--device", "cpu", "--no-progress"],
                       capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    said = f"\n--- stderr ---\n{r.stderr[-4000:]}"
    assert r.returncode != 0, "a broken case must make the run fail" + said  # and the good ones are still done
    assert (out / "summary.json").is_file(), "rank 0 wrote no summary" + said
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["cases"] == 7 and summary["failed"] == 2, said
    rows = {Path(row["input"]).name: row for row in summary["rows"]}
    assert set(rows) == {f"{n}.nii.gz" for n in names} | {"broken.nii.gz", "case1b.nii.gz"}
    assert (rows["broken.nii.gz"]["rank"], rows["case1b.nii.gz"]["rank"]) == (0, 1)
    assert {row["rank"] for row in rows.values()} == {0, 1}
    for n in names:  # written once, on the input grid, next to its own report naming the rank's device
        assert rows[f"{n}.nii.gz"]["ok"]
        assert read_volume(out / f"{n}_seg.nii.gz").same_geometry(vol)
        assert json.loads((out / f"{n}_report.json").read_text())["device"] == "cpu"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("case")) == sorted(
        [f"{n}_seg.nii.gz" for n in names] + [f"{n}_report.json" for n in names])
    assert "[rank 1/2]" in r.stderr and "broken.nii.gz" in r.stderr and "case1b.nii.gz" in r.stderr


def test_every_option_has_help_and_is_documented():
    import argparse

    from LumbarSegmentLib.cli.main import build_parser

    doc = (ROOT / "docs" / "cli.md").read_text()
    subs = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("segment", "models"):
        for action in subs.choices[name]._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and action.help.strip(), f"{name} {action.option_strings or action.dest}: no help"
            for opt in action.option_strings:
                if opt.startswith("--"):
                    assert f"`{opt}" in doc, f"{name} {opt} is not in docs/cli.md"


def test_progress_bar_starts_with_the_total(tmp_path, tiny_package, capsys):
    src = tmp_path / "a.nii.gz"
    write_volume(sagittal_sample(slices=2), src)
    assert main(["segment", str(src), "-o", str(tmp_path / "a_seg.nii.gz"), "--model", str(tiny_package.path)]) == 0
    err = capsys.readouterr().err
    frames = [f for f in err.replace("\r", "\n").splitlines() if "a.nii.gz" in f]
    assert frames and "/" in frames[0] and "0batch" not in err, err[:300]


def test_output_folder_made_by_another_rank_meanwhile_is_fine(tmp_path, tiny_package, monkeypatch):
    """torchrun's ranks all see OUT missing, then race to create it: the losers must go on, not fail."""
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    for n in ("a", "b"):
        write_volume(sagittal_sample(slices=2), cohort / f"{n}.nii.gz")
    out = tmp_path / "out"
    out.mkdir()  # made by the other rank just after this one looked
    real_exists = Path.exists
    monkeypatch.setattr(Path, "exists", lambda self, *a, **k: False if self == out else real_exists(self, *a, **k))
    rc = main(["segment", str(cohort), "-o", str(out), "--model", str(tiny_package.path), "--no-progress"])
    assert rc == 0 and sorted(p.name for p in out.glob("*_seg.nii.gz")) == ["a_seg.nii.gz", "b_seg.nii.gz"]
