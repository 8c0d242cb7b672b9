"""The effort ledger (LumbarSegmentLib/dataset/effort.py), its record in exports and ``lumbarseg-train effort``."""
from __future__ import annotations

import json

import numpy as np

from LumbarSegmentLib.dataset.cases import write_case
from LumbarSegmentLib.dataset.effort import IDLE_S, EffortLedger, summarise
from LumbarSegmentLib.core.volume import Volume


def test_ledger_counts_hand_edits_clicks_and_active_time_only():
    led = EffortLedger()
    before = np.zeros((4, 5, 6), np.uint8)
    after = before.copy()
    after[1, 1:3, 1:4] = 1  # 6 painted
    led.add_hand_edit(before, after)
    again = after.copy()
    again[1, 1, 1:4] = 0  # 3 erased
    led.add_hand_edit(after, again)
    led.add_click(40)
    for t in (0.0, 10.0, 25.0, 25.0 + IDLE_S + 1, 30.0 + IDLE_S + 1):  # one long pause is not counted
        led.touch(t)
    assert led.to_dict() == {"clicks": 1, "voxels_painted": 6, "voxels_erased": 3, "voxels_by_clicks": 40,
                             "active_seconds": 30.0}
    assert EffortLedger.from_dict(json.loads(json.dumps(led.to_dict()))).to_dict() == led.to_dict()


def _export(folder, case_id, model, effort):
    img = Volume(np.ones((3, 4, 5), np.float32))
    lab = img.with_array(np.zeros((3, 4, 5), np.uint8))
    extra = {"drafted_by": {"model": model}}
    if effort is not None:
        extra["effort"] = effort
    return write_case(folder, case_id, img, lab, labels={1: "vertebral_body"},
                      annotated_structures=["vertebral_body"], extra=extra)


def test_summary_per_drafting_model_and_the_command(tmp_path, capsys):
    from LumbarSegmentLib.training.cli import main

    _export(tmp_path, "A", "uvd-starter@4", {"clicks": 0, "voxels_painted": 0, "voxels_erased": 0,
                                             "voxels_by_clicks": 0, "active_seconds": 20})
    _export(tmp_path, "B", "uvd-starter@4", {"clicks": 3, "voxels_painted": 100, "voxels_erased": 0,
                                             "voxels_by_clicks": 500, "active_seconds": 100})
    _export(tmp_path, "C", "uvd-starter@5", {"clicks": 1, "voxels_painted": 0, "voxels_erased": 10,
                                             "voxels_by_clicks": 50, "active_seconds": 40})
    _export(tmp_path, "D", "uvd-starter@5", None)
    from LumbarSegmentLib.dataset.cases import list_cases

    rows = {r["model"]: r for r in summarise(list_cases(tmp_path))}
    assert rows["uvd-starter@4"]["accepted_unedited"] == 1 and rows["uvd-starter@4"]["median_voxels_corrected"] == 300
    assert rows["uvd-starter@5"]["cases"] == 1 and rows["uvd-starter@5"]["without_record"] == 1
    assert rows["uvd-starter@5"]["median_active_seconds"] == 40
    chart = tmp_path / "effort.png"
    assert main(["effort", str(tmp_path), "--chart", str(chart)]) == 0
    out = capsys.readouterr().out
    # per version: cases, accepted unedited, median voxels corrected, median clicks, median active minutes
    assert "| uvd-starter@4 | 2 | 1 | 300 | 1.5 | 1.0 | 0 |" in out
    assert "| uvd-starter@5 | 1 | 0 | 60 | 1 | 0.7 | 1 |" in out
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_publish_shows_effort_only_when_exports_recorded_it(tmp_path):
    from LumbarSegmentLib.training.publish import _effort_rows

    _export(tmp_path / "old", "A", "uvd-starter@4", None)
    assert _effort_rows(tmp_path / "old") == []
    _export(tmp_path / "new", "A", "uvd-starter@5", {"clicks": 2, "voxels_by_clicks": 80, "active_seconds": 12})
    (row,) = _effort_rows(tmp_path / "new")
    assert row["model"] == "uvd-starter@5" and row["median_voxels_corrected"] == 80
    assert _effort_rows(tmp_path / "new", ["uvd-starter@4"]) == []  # only the models the gate compares


def test_the_gates_report_shows_the_effort_of_the_model_in_use_next_to_dice(tmp_path, capsys):
    from LumbarSegmentLib.training.cli import main

    from test_training_run import _tiny_package, write_synthetic_dataset

    data = tmp_path / "data"
    ids = write_synthetic_dataset(data, n_cases=2, size=40)
    _export(data, "E1", "bad@1", {"clicks": 2, "voxels_painted": 30, "voxels_by_clicks": 70, "active_seconds": 90})
    _export(data, "E2", "elsewhere@3", {"clicks": 0, "active_seconds": 5})
    bad = _tiny_package(tmp_path / "bad", "bad", bias=[10.0, 0.0, 0.0])
    good = _tiny_package(tmp_path / "good", "good", bias=[0.0, 0.0, 10.0])
    common = ["--registry", str(tmp_path / "reg"), "--data", str(data), "--cases", ",".join(ids), "--device", "cpu"]
    assert main(["publish", str(bad.path), *common]) == 0
    capsys.readouterr()
    assert main(["publish", str(good.path), *common]) == 0
    report = capsys.readouterr().out.rpartition("published ")[0]
    assert report.index("mean Dice") < report.index("annotation effort")
    assert "| bad@1 | 1 | 0 | 100 | 2 | 1.5 | 0 |" in report and "elsewhere@3" not in report
