"""One patient, several cases: the patient map, the splits that honour it, the script that finds
candidates, and the training option that stops unlabelled spine levels from counting as background.

The lumbar-mr data set names no patients, yet holds one volume under two ids four times and two
sequences of one study twice (scripts/recipes/lumbar-mr-patients.json); before the map, the split
put a test case's own volume in the training set.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from LumbarSegmentLib.dataset.cases import CaseError, list_cases, read_patient_map, with_patients, write_case
from LumbarSegmentLib.training.data import IGNORE_INDEX, CaseSlices, ignore_beyond_levels
from LumbarSegmentLib.training.splits import fixed_split
from LumbarSegmentLib.core.volume import Volume

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "scripts" / "recipes"
VB = {1: "vertebral_body"}


def _map_file(tmp_path, patients) -> Path:
    p = tmp_path / "patients.json"
    p.write_text(json.dumps({"format": "lumbarsegment.patients", "format_version": 1, "patients": patients}))
    return p


def _write(folder, case_id, image):
    label = np.zeros_like(image, dtype=np.uint8)
    label[2:4, 2:6, 2:6] = 1
    return write_case(folder, case_id, Volume(image), Volume(label), labels=VB, annotated_structures=["vertebral_body"])


def test_patient_map_groups_cases_and_leaves_the_rest_alone(tmp_path):
    rng = np.random.default_rng(0)
    for cid in ("A_1", "A_2", "B_1"):
        _write(tmp_path / "data", cid, rng.random((6, 8, 8)).astype(np.float32))
    before = list_cases(tmp_path / "data")
    patient_of = read_patient_map(_map_file(tmp_path, {"p1": {"cases": ["A_1", "A_2"], "evidence": "same study"}}))
    after = with_patients(before, patient_of)
    assert [c.patient for c in after] == ["p1", "p1", "B_1"]
    assert [c.patient for c in before] == ["A_1", "A_2", "B_1"]  # copies: the listed cases are untouched
    # a fixed split now keeps the patient together: A_2 may not train while A_1 validates
    train, val, dropped = fixed_split(after, ["A_1"])
    assert [c.case_id for c in val] == ["A_1"] and dropped == ["A_2"] and [c.case_id for c in train] == ["B_1"]


@pytest.mark.parametrize("content, says", [
    ("{not json", "cannot be read as JSON"),
    (json.dumps({"patients": {}}), "not a lumbarsegment.patients file"),
    (json.dumps({"format": "lumbarsegment.patients", "patients": {"p": "A_1"}}), "needs a list of case ids"),
    (json.dumps({"format": "lumbarsegment.patients", "patients": {"p": ["A_1"], "q": ["A_1"]}}),
     "A_1 is listed under two patients"),
])
def test_bad_patient_maps_are_refused_by_name(tmp_path, content, says):
    p = tmp_path / "m.json"
    p.write_text(content)
    with pytest.raises(CaseError, match=says):
        read_patient_map(p)


def test_training_cli_excludes_and_validates_whole_patients(tmp_path, monkeypatch):
    from LumbarSegmentLib.training import cli

    rng = np.random.default_rng(1)
    for cid in ("A_1", "A_2", "B_1", "C_1", "C_2"):
        _write(tmp_path / "data", cid, rng.random((6, 8, 8)).astype(np.float32))
    m = _map_file(tmp_path, {"a": ["A_1", "A_2"], "c": ["C_1", "C_2"]})
    a = cli.build_parser().parse_args(["train", "--data", str(tmp_path / "data"), "--patients", str(m),
                                       "--exclude", "A_2", "--val-cases", "C_1", "--out", str(tmp_path / "run")])
    said = []  # the CLI's own logger (other tests may have stopped it propagating to pytest's capture)
    monkeypatch.setattr(cli.log, "warning", lambda msg, *args: said.append(msg % args))
    cases = cli._select(a)
    train, val = cli._split(a, cases)
    assert [c.case_id for c in cases] == ["B_1", "C_1", "C_2"]  # A_1 goes with the excluded A_2
    assert [c.case_id for c in train] == ["B_1"] and [c.case_id for c in val] == ["C_1"]
    assert said == ["not using A_1: same patient as an excluded case",
                    "not training on C_2: same patient as a validation case"]


def test_candidates_are_identical_volumes_and_cases_alone_on_a_study_grid(tmp_path):
    finder = load_script(ROOT / "scripts" / "find_same_patient.py", "find_same_patient")
    rng = np.random.default_rng(2)
    same = rng.random((6, 8, 8)).astype(np.float32)
    _write(tmp_path, "S1_01", same)
    _write(tmp_path, "S1_02", same.copy())  # one volume exported twice
    _write(tmp_path, "S1_03", rng.random((6, 8, 8)).astype(np.float32))  # the source's common grid
    _write(tmp_path, "S2_01", rng.random((5, 9, 9)).astype(np.float32))  # two cases alone on a grid of S2
    _write(tmp_path, "S2_02", rng.random((5, 9, 9)).astype(np.float32))
    _write(tmp_path, "S2_03", rng.random((7, 9, 9)).astype(np.float32))
    found = {tuple(f["cases"]): f for f in finder.candidates(tmp_path)}
    assert set(found) == {("S1_01", "S1_02"), ("S2_01", "S2_02")}
    assert found[("S1_01", "S1_02")]["kind"] == "identical"
    g = found[("S2_01", "S2_02")]
    assert g["kind"] == "same study grid" and g["label_dice"] == 1.0 and abs(g["image_correlation"]) < 0.5


def test_shipped_patient_map_and_splits(shared_data):
    """v2 puts every patient on one side; v1 (the shipped models' split) leaked exactly what the docs say."""
    patient_of = read_patient_map(RECIPES / "lumbar-mr-patients.json")
    ids = sorted(c.case_id for c in list_cases(shared_data / "lumbar-mr"))
    assert set(patient_of) <= set(ids)

    def sides(split):
        return {c: ("test" if c in split["test"] else "val" if c in split["val"] else "train") for c in ids}

    def straddling(split):
        side = sides(split)
        groups: dict[str, set] = {}
        for c in ids:
            groups.setdefault(patient_of.get(c, c), set()).add((side[c], c))
        return sorted(tuple(sorted(g)) for g in groups.values() if len({s for s, _ in g}) > 1)

    v2 = json.loads((RECIPES / "lumbar-mr-split-v2.json").read_text())
    assert v2["patients"] == "lumbar-mr-patients.json" and straddling(v2) == []
    v1 = json.loads((RECIPES / "lumbar-mr-split.json").read_text())
    assert straddling(v1) == [(("test", "VB1_08"), ("train", "VB1_07")), (("test", "VB3_54"), ("train", "VB3_52")),
                              (("train", "VB1_11"), ("val", "VB1_10"))]


def test_the_duplicate_named_in_the_map_is_one_volume(shared_data):
    from LumbarSegmentLib.training.data import select_cases

    (i52, l52), (i54, l54) = (c.load() for c in select_cases(shared_data / "lumbar-mr", ["VB3_52", "VB3_54"]))
    assert np.array_equal(i52.array, i54.array) and np.array_equal(l52.array, l54.array)


def _slices(rows_with_label, height=40):
    lab = torch.zeros((3, height, 10), dtype=torch.uint8)
    lab[1, rows_with_label[0]:rows_with_label[1], 2:8] = 1
    return CaseSlices("c", "c", torch.zeros(lab.shape), lab, torch.tensor([True, True, False]))


def test_rows_next_to_the_labelled_levels_become_unknown_and_far_rows_stay_background():
    c = _slices((15, 25))
    done = ignore_beyond_levels([c], band_mm=5.0, row_mm=1.0, margin_mm=2.0)
    ignored_rows = (c.label == IGNORE_INDEX).all(dim=2).all(dim=0).nonzero().flatten().tolist()
    assert ignored_rows == [8, 9, 10, 11, 12, 27, 28, 29, 30, 31] and done == {"c": 10}
    assert int((c.label == 1).sum()) == 60  # the label itself untouched; rows 13-26 keep their background
    assert (c.label[:, :8] == 0).all() and (c.label[:, 32:] == 0).all()
    # at the image edge the band is cut, and a case without labels is left alone
    edge, empty = _slices((1, 5)), _slices((0, 0))
    assert ignore_beyond_levels([edge, empty], band_mm=5.0) == {"c": 5}
    assert (edge.label[:, 7:12] == IGNORE_INDEX).all() and not (empty.label == IGNORE_INDEX).any()
    assert ignore_beyond_levels([_slices((15, 25))], band_mm=0) == {}


def test_band_option_is_checked():
    from LumbarSegmentLib.training.config import TrainConfig

    with pytest.raises(ValueError, match="--ignore-beyond-levels"):
        TrainConfig(beyond_levels_mm=-1)


def test_publish_gate_skips_cases_of_patients_the_candidate_trained_on():
    from types import SimpleNamespace

    from LumbarSegmentLib.dataset.cases import Case
    from LumbarSegmentLib.training.publish import _unseen

    cand = SimpleNamespace(manifest={"training": {"train_cases": ["A_1", "B_1"], "data_manifest": [
        {"case": "A_1", "patient": "a"}, {"case": "B_1", "patient": "B_1"}, {"case": "V_1", "patient": "v"}]}})
    cases = [Case(cid, Path("i"), Path("l"), VB, ["vertebral_body"], patient=p)
             for cid, p in (("A_2", "a"), ("B_1", "B_1"), ("V_1", "v"), ("C_1", ""))]
    keep, dropped = _unseen(cand, cases)
    assert [c.case_id for c in keep] == ["V_1", "C_1"] and dropped == ["A_2", "B_1"]


def test_validation_report_refuses_test_cases_whose_patient_trained_the_model(shared_data, tmp_path, capsys):
    report = load_script(ROOT / "scripts" / "validation_report.py", "validation_report")
    out = tmp_path / "report"
    rc = report.main(["--models", "uvd-starter@4", "--registry", str(ROOT / "Resources" / "Models"), "--which", "test",
                      "--split", str(RECIPES / "lumbar-mr-split.json"), "--data", str(shared_data / "lumbar-mr"),
                      "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert "VB1_08: its patient trained uvd-starter@4 (as VB1_07)" in err and "VB3_54" in err and "VB1_16" not in err


def test_level_diagnostics_recall_per_vertebra_and_smooth_reading():
    diag = load_script(ROOT / "scripts" / "level_diagnostics.py", "level_diagnostics")
    inst = np.zeros((4, 30, 10), np.uint8)
    inst[:, 2:8, 2:8], inst[:, 12:18, 2:8], inst[:, 22:28, 2:8] = 7, 3, 5  # top, middle, bottom
    pred = inst > 0
    pred[:, 22:25] = False  # the bottom vertebra half missed
    assert diag.level_recalls(inst, pred) == [(7, 1.0), (3, 1.0), (5, 0.5)]
    # a mask copied over runs of 3 slices: its smooth reading differs from it only at the run edges
    blocky = np.repeat(np.array([[0, 1], [1, 1], [1, 1], [1, 0]], bool)[:, None, :], 3, axis=0)
    assert 0.8 < diag.smooth_reading_dice(blocky) < 1.0
    assert diag.smooth_reading_dice(np.ones((5, 3, 3), bool)) == 1.0
