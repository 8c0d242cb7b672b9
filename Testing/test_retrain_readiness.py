"""Before a retrain: what a small team (1-5 exported cases) is told, and the hold-out it is offered."""
from __future__ import annotations

import numpy as np
import pytest

from LumbarSegmentLib.dataset.cases import write_case
from LumbarSegmentLib.dataset.holdout import HOLDOUT_FILE, frozen_split, set_holdout
from LumbarSegmentLib.dataset.readiness import readiness
from LumbarSegmentLib.core.volume import Volume


def _export(folder, n: int) -> None:
    image = Volume(np.zeros((4, 8, 8), np.int16), spacing=(1.0, 1.0, 1.0))
    lab = np.zeros((4, 8, 8), np.uint8)
    lab[1:3, 2:6, 2:6] = 1
    for i in range(n):
        write_case(folder, f"case{i + 1}", image, image.with_array(lab), labels={1: "vertebral_body"},
                   annotated_structures=["vertebral_body"])


def test_no_case_says_export_first(tmp_path):
    r = readiness(tmp_path / "cases")
    assert not r.can_start and "export at least one case" in r.message()


@pytest.mark.parametrize("n", [1, 2])
def test_one_or_two_cases_train_but_cannot_replace_the_model(tmp_path, n):
    _export(tmp_path, n)
    r = readiness(tmp_path)
    assert r.can_start and not r.can_replace and r.suggested_holdout() == []
    msg = r.message()
    assert "option to choose, not as the default" in msg and "export at least 3 cases" in msg
    assert not (tmp_path / HOLDOUT_FILE).exists()  # asking writes nothing


@pytest.mark.parametrize("n", [3, 5])
def test_three_to_five_cases_are_offered_a_holdout_that_makes_the_gate_grade(tmp_path, n):
    _export(tmp_path, n)
    r = readiness(tmp_path)
    pick = r.suggested_holdout()
    assert len(pick) == 2 and ", ".join(pick) in r.message()
    split = set_holdout(tmp_path, pick)  # what the page's "Hold out ... and train" button does
    after = readiness(tmp_path)
    assert after.can_replace and after.can_start and len(split.train) == n - 2
    assert "replaces the model in use only if it is at least as good" in after.message()


def test_the_default_split_needs_about_eight_patients(tmp_path):
    _export(tmp_path, 8)
    frozen_split(tmp_path)  # a retrain assigns the patients: every 4th is held out
    r = readiness(tmp_path)
    assert r.can_replace and len(r.holdout) == 2 and r.suggested_holdout() == []
