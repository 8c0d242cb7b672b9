"""``registry.lineage.trained_patients``: one rule for "did this model see this patient", which the
publish gate and the validation report both follow, parents included."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from LumbarSegmentLib.core.schema import load_schema
from LumbarSegmentLib.dataset.cases import Case
from LumbarSegmentLib.models import build_model
from LumbarSegmentLib.registry.catalog import Catalog
from LumbarSegmentLib.registry.lineage import trained_patients
from LumbarSegmentLib.registry.package import read_package, write_package
from LumbarSegmentLib.registry.registry import Registry

STARTER = load_schema("starter")


def _case(case_id, patient=""):
    return Case(case_id, Path("i"), Path("l"), {1: "vertebral_body"}, ["vertebral_body"], patient=patient)


def _package(folder, cases, patients, parent=None):
    torch.manual_seed(len(str(folder)))
    training = {"train_cases": list(cases), "val_cases": [],
                "data_manifest": [{"case": c, "version": 1, "patient": patients.get(c, c),
                                   "annotated_structures": ["vertebral_body"], "image_sha256": "a" * 64,
                                   "label_sha256": "b" * 64} for c in cases]}
    return write_package(folder, build_model("UD", num_classes=3, init_filters=4).eval(), name="tiny",
                         schema=STARTER, training=training,
                         parent={"ref": parent.ref, "sha256": parent.sha256} if parent is not None else None)


@pytest.fixture()
def child_of_p(tmp_path):
    """A registry holding a parent trained on patient P (as case P_1), and a run folder's child of it
    trained on Q_1 only."""
    reg = Registry(tmp_path / "reg")
    parent = _package(tmp_path / "parent", ["P_1"], {"P_1": "P"})
    published = reg.publish(parent, catalog=Catalog.around(reg))
    child = _package(tmp_path / "child", ["Q_1"], {}, parent=published)
    return read_package(child.path), reg


def test_a_child_counts_its_parents_patients_as_seen(child_of_p):
    child, reg = child_of_p
    lineage = trained_patients(child, Catalog([reg]))
    assert lineage.cases == {"P_1", "Q_1"} and lineage.missing == ()
    assert lineage.via(_case("P_2", "P")) == ["P_1"]  # another case of patient P
    assert lineage.saw(_case("Q_1")) and not lineage.saw(_case("N_1"))
    mapped = trained_patients(child, [reg], {"P_9": "P"})  # the caller's patient map names P_9's patient
    assert mapped.saw(_case("P_9"))


def test_the_gate_and_the_validation_report_agree(child_of_p):
    from LumbarSegmentLib.training.evaluate import seen_patients
    from LumbarSegmentLib.training.publish import _unseen

    child, reg = child_of_p
    cases = [_case("P_2", "P"), _case("N_1"), _case("Q_1")]
    keep, dropped = _unseen(child, cases, Catalog([reg]))
    assert [c.case_id for c in keep] == ["N_1"] and dropped == ["P_2", "Q_1"]
    lines, missing = seen_patients(cases, {"child": [child]}, None, [reg])
    assert lines == [f"P_2: its patient trained {child.ref} (as P_1)", f"Q_1: its patient trained {child.ref} (as Q_1)"]
    assert missing == []


def test_an_ancestor_that_cannot_be_found_is_named(tmp_path):
    orphan = _package(tmp_path / "orphan", ["O_1"], {})
    orphan.manifest["parent"] = {"ref": "gone@3", "sha256": "c" * 64}
    lineage = trained_patients(orphan, [Registry(tmp_path / "empty")])
    assert lineage.cases == {"O_1"} and lineage.missing == ("gone@3",)
