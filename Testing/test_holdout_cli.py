"""``lumbarseg-train holdout``: showing, choosing and redrawing a dataset's frozen held-out cases.

The publish gate grades candidates on these cases, so the command must say exactly which
cases they are, change them only when asked, and refuse a mistyped case id with one line
(exit 2) instead of silently holding out nobody.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from LumbarSegmentLib.dataset.cases import write_case
from LumbarSegmentLib.dataset.holdout import HOLDOUT_FILE, frozen_split
from LumbarSegmentLib.training.cli import main
from LumbarSegmentLib.core.volume import Volume


@pytest.fixture
def dataset(tmp_path):
    """Six tiny cases of five patients (p2 has two cases)."""
    image = Volume(np.zeros((4, 4, 2), np.int16))
    lab = np.zeros((4, 4, 2), np.uint8)
    lab[1, 1, 1] = 1
    for i, p in enumerate(["p1", "p2", "p2", "p3", "p4", "p5"]):
        write_case(tmp_path, f"c{i}", image, image.with_array(lab), labels={1: "vertebral_body"},
                   annotated_structures=["vertebral_body"], patient=p)
    return tmp_path


def test_show_prints_the_split_and_writes_nothing(dataset, capsys):
    assert main(["holdout", "--data", str(dataset)]) == 0
    out = capsys.readouterr().out
    assert "held out (1 of 6 cases" in out and ": c4" in out  # p4 is the 4th patient
    assert "train: c0, c1, c2, c3, c5" in out
    assert not (dataset / HOLDOUT_FILE).exists()


def test_cases_choose_whole_patients_and_freeze_them(dataset, capsys):
    assert main(["holdout", "--data", str(dataset), "--cases", "c1,c5", "--show"]) == 0
    out = capsys.readouterr().out
    assert "c1, c2, c5" in out  # c2 shares c1's patient, so it is held out too
    assert frozen_split(dataset).holdout_ids == ["c1", "c2", "c5"]
    saved = json.loads((dataset / HOLDOUT_FILE).read_text())["patients"]
    assert [p for p, side in saved.items() if side == "holdout"] == ["p2", "p5"]


def test_every_redraws_the_split(dataset, capsys):
    assert main(["holdout", "--data", str(dataset), "--cases", "c0"]) == 0
    assert main(["holdout", "--data", str(dataset), "--every", "2"]) == 0
    assert frozen_split(dataset).holdout_ids == ["c1", "c2", "c4"]  # patients p2 and p4
    assert json.loads((dataset / HOLDOUT_FILE).read_text())["every"] == 2


@pytest.mark.parametrize("args, words", [
    (["--cases", "c1,nope"], "unknown case id(s)"),
    (["--every", "1"], "at least 2"),
    (["--cases", "c1", "--every", "3"], "not both"),
])
def test_bad_requests_are_one_line_exit_2_and_change_nothing(dataset, capsys, args, words):
    assert main(["holdout", "--data", str(dataset), "--cases", "c3"]) == 0
    before = (dataset / HOLDOUT_FILE).read_text()
    capsys.readouterr()
    assert main(["holdout", "--data", str(dataset), *args]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "nope" in err or "nope" not in args[1]  # the message names the mistyped id
    assert (dataset / HOLDOUT_FILE).read_text() == before


def test_a_missing_dataset_is_one_line_exit_2(tmp_path, capsys):
    assert main(["holdout", "--data", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1


def test_finetune_leaves_the_held_out_cases_out_unless_told(dataset, caplog):
    """The gate grades on the held-out cases, so a fine-tune must not train on them, whoever starts it."""
    import argparse

    from LumbarSegmentLib.dataset.cases import list_cases
    from LumbarSegmentLib.dataset.holdout import held_out_ids
    from LumbarSegmentLib.training.cli import _without_held_out

    cases = list_cases(dataset)
    assert held_out_ids(dataset) == set()  # no frozen split yet: nothing is held out, nothing written
    assert not (dataset / HOLDOUT_FILE).exists()
    assert main(["holdout", "--data", str(dataset), "--cases", "c4"]) == 0
    assert held_out_ids(dataset) == {"c4"}
    args = argparse.Namespace(data=str(dataset), use_held_out=False)
    with caplog.at_level("WARNING"):
        kept = _without_held_out(args, cases)
    assert [c.case_id for c in kept] == ["c0", "c1", "c2", "c3", "c5"]
    assert "not training on c4" in caplog.text
    args.use_held_out = True
    assert len(_without_held_out(args, cases)) == 6
