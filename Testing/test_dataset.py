"""``dataset.Dataset``: the one view of an exported-case folder (or several) with its patient map.

The CLI's finetune, the publish gate, the retrain job and the browser's worklist all read it, so these
tests pin what they rely on: cases and patients from the map, the held-out cases of every folder, what
a fine-tune may train on, and a listing that survives a damaged case file.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from LumbarSegmentLib.core.volume import Volume
from LumbarSegmentLib.dataset.cases import write_case
from LumbarSegmentLib.dataset.dataset import Dataset, SelectionError
from LumbarSegmentLib.dataset.holdout import HoldoutError, set_holdout


def _cases(folder, spec):
    image = Volume(np.zeros((4, 4, 2), np.int16))
    lab = np.zeros((4, 4, 2), np.uint8)
    lab[1, 1, 1] = 1
    for cid, patient in spec:
        write_case(folder, cid, image, image.with_array(lab), labels={1: "vertebral_body"},
                   annotated_structures=["vertebral_body"], patient=patient)
    return folder


@pytest.fixture
def two_folders(tmp_path):
    a = _cases(tmp_path / "a", [("A_1", ""), ("A_2", ""), ("A_3", "")])
    b = _cases(tmp_path / "b", [("B_1", "pb"), ("B_2", "pb2")])
    m = tmp_path / "patients.json"
    m.write_text(json.dumps({"format": "lumbarsegment.patients", "format_version": 1,
                             "patients": {"pa": ["A_1", "A_2"]}}))
    return a, b, m


def test_cases_of_several_folders_take_their_patients_from_the_map(two_folders):
    a, b, m = two_folders
    ds = Dataset(f"{a},{b}", m)
    assert [(c.case_id, c.patient) for c in ds.cases()] == [
        ("A_1", "pa"), ("A_2", "pa"), ("A_3", "A_3"), ("B_1", "pb"), ("B_2", "pb2")]
    assert [c.case_id for c in ds.cases(["B_2", "A_1"])] == ["B_2", "A_1"]
    with pytest.raises(SelectionError, match=r"no case\(s\) \['X_9'\]"):
        ds.cases(["X_9"])


def test_an_excluded_case_takes_its_patient_only_with_a_map(two_folders):
    a, b, m = two_folders
    assert Dataset(a, m).select(exclude=["A_2"]) == (Dataset(a, m).cases(["A_3"]), ["A_1"])
    cases, also = Dataset(a).select(exclude=["A_2"])
    assert [c.case_id for c in cases] == ["A_1", "A_3"] and also == []


def test_held_out_and_trainable_span_every_folder(two_folders):
    a, b, m = two_folders
    set_holdout(a, ["A_3"])
    set_holdout(b, ["pb"])
    ds = Dataset(f"{a},{b}", m)
    assert ds.held_out_ids() == {"A_3", "B_1"}
    assert [c.case_id for c in ds.held_out()] == ["A_3", "B_1"]
    assert [c.case_id for c in ds.trainable()] == ["A_1", "A_2", "B_2"]
    assert ds.without_held_out(ds.cases(["A_1", "B_1"]))[1] == ["B_1"]


def test_held_out_refuses_rather_than_writes_and_a_retrain_splits_one_folder(two_folders):
    a, b, _ = two_folders
    with pytest.raises(HoldoutError, match="no frozen held-out split yet"):
        Dataset(a).held_out()
    assert Dataset(a).held_out_ids() == set()  # no split file: nothing held out, nothing written
    with pytest.raises(SelectionError, match="one dataset folder"):
        Dataset(f"{a},{b}").split()
    assert Dataset(a).split().every == 4 and (a / ".holdout.json").exists()


def test_claimed_ids_skip_a_damaged_file_but_keep_its_id(two_folders):
    a, _, _ = two_folders
    (a / "Z_1__v1.json").write_text("{not json")
    damaged = []
    assert Dataset(a).claimed_ids(damaged) == {"A_1", "A_2", "A_3", "Z_1"}
    assert [p.name for p, _ in damaged] == ["Z_1__v1.json"]


def test_finetune_and_publish_read_the_same_dataset(two_folders, monkeypatch):
    """The CLI's selection and its held-out filter are the Dataset's, patient map included."""
    from LumbarSegmentLib.training import cli

    a, b, m = two_folders
    set_holdout(a, ["A_3"])
    said = []
    monkeypatch.setattr(cli.log, "warning", lambda msg, *args: said.append(msg % args))
    args = argparse.Namespace(data=f"{a},{b}", patients=str(m), cases=None, exclude="A_1", use_held_out=False)
    kept = cli._without_held_out(args, cli._select(args))
    assert [c.case_id for c in kept] == ["B_1", "B_2"]
    assert said[0] == "not using A_2: same patient as an excluded case" and "not training on A_3" in said[1]
