"""Pseudo-labels (training.pseudo): a teacher drafts the structures a case does not annotate.

The teachers here are tiny packages whose class-score layers are set by hand, so what they
say is known exactly: "disc everywhere, sure" or "disc everywhere, unsure". The rules under
test: the manual label always wins, sure drafts become labels, unsure ones are ignored, the
drafted class counts as annotated afterwards, and the run records (and caches) what was drafted.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from LumbarSegmentLib.dataset.cases import list_cases, write_case
from LumbarSegmentLib.models import build_model
from LumbarSegmentLib.registry.packages import default_input_contract, read_package, write_package
from LumbarSegmentLib.core.schema import load_schema
from LumbarSegmentLib.training import pseudo
from LumbarSegmentLib.training.config import TrainConfig
from LumbarSegmentLib.training.data import IGNORE_INDEX, DataError, load_dataset
from LumbarSegmentLib.training.finetune import finetune
from LumbarSegmentLib.core.volume import Volume

torch.set_num_threads(1)
STARTER = load_schema("starter")
TINY = dict(variant="UD", init_filters=4, epochs=1, steps_per_epoch=2, batch_size=2, patch=32, precision="fp32",
            log_every=1, progress_bar=False, warmup_steps=1, patience=0)


def _teacher(folder, disc_logit: float):
    """A package that scores "disc" ``disc_logit`` above background and body at every pixel."""
    torch.manual_seed(0)
    model = build_model("UD", num_classes=3, init_filters=4, deep_supervision=False).eval()
    with torch.no_grad():
        for m in model.head_modules().values():
            m.weight.zero_()
            m.bias.copy_(torch.tensor([0.0, 0.0, disc_logit]))
    return write_package(folder, model, name="teacher", schema=STARTER, input_contract=default_input_contract())


def _dataset(folder, n=2, size=40, slices=3):
    """Bodies-only cases: a bright square labelled 1 in every slice."""
    rng = np.random.default_rng(0)
    for i in range(n):
        img = rng.normal(50, 5, (size, size, slices)).astype(np.int16)
        lab = np.zeros_like(img, dtype=np.uint8)
        img[10:20, 10:20] += 100
        lab[10:20, 10:20] = 1
        vol = Volume(img)
        write_case(folder, f"vb{i}", vol, vol.with_array(lab), labels={1: "vertebral_body"},
                   annotated_structures=["vertebral_body"])
    return list_cases(folder)


def test_sure_teacher_fills_the_unannotated_class_and_the_manual_label_wins(tmp_path):
    cases = _dataset(tmp_path / "data")
    data = load_dataset(cases, STARTER)
    manual = [d.label.clone() for d in data]
    teacher = _teacher(tmp_path / "t", 6.0)  # p(disc) = e^6 / (2 + e^6) = 0.995
    summary = pseudo.add_pseudo_labels(data, cases, [str(teacher.path)], STARTER, (1.0, 1.0), threshold=0.8)
    disc = STARTER.channel_of()["intervertebral_disc"]
    for d, m in zip(data, manual):
        assert torch.equal(d.label[m == 1], m[m == 1])  # every manual body voxel kept
        assert bool((d.label[m == 0] == disc).all())  # everything else: the teacher's sure disc
        assert bool(d.annotated[disc]) and bool(d.annotated[STARTER.channel_of()["vertebral_body"]])
        assert d.info["pseudo"]["classes"] == ["intervertebral_disc"]
    assert set(summary["cases"]) == {"vb0", "vb1"}
    assert summary["teachers"][0]["weights_sha256"] == teacher.sha256


def test_unsure_teacher_voxels_are_ignored_not_learnt(tmp_path):
    cases = _dataset(tmp_path / "data", n=1)
    data = load_dataset(cases, STARTER)
    manual = data[0].label.clone()
    teacher = _teacher(tmp_path / "t", 0.7)  # disc wins (p ~ 0.5) but below the 0.8 threshold
    pseudo.add_pseudo_labels(data, cases, [str(teacher.path)], STARTER, (1.0, 1.0), threshold=0.8)
    lab = data[0].label
    assert bool((lab[manual == 0] == IGNORE_INDEX).all())
    assert torch.equal(lab[manual == 1], manual[manual == 1])
    # nothing but manual foreground is left to centre patches on
    assert data[0].fg_slices == [s for s in range(lab.shape[0]) if bool((manual[s] == 1).any())]


def test_unknown_teacher_and_bad_threshold_are_refused(tmp_path):
    cases = _dataset(tmp_path / "data", n=1)
    data = load_dataset(cases, STARTER)
    with pytest.raises(DataError, match="teacher 'no-such-model@9'"):
        pseudo.add_pseudo_labels(data, cases, ["no-such-model@9"], STARTER, (1.0, 1.0))
    with pytest.raises(DataError, match="threshold"):
        pseudo.add_pseudo_labels(data, cases, ["x"], STARTER, (1.0, 1.0), threshold=0.3)
    with pytest.raises(ValueError, match="pseudo_threshold"):
        TrainConfig(pseudo_threshold=1.0)


def test_finetune_with_parent_teacher_records_and_caches_the_drafts(tmp_path, monkeypatch):
    cases = _dataset(tmp_path / "data")
    parent = _teacher(tmp_path / "parent", 6.0)
    cfg = TrainConfig(**TINY, pseudo_labels=("parent",))
    r = finetune(str(parent.path), cases, [], out_dir=tmp_path / "run", config=cfg)
    summary = json.loads((tmp_path / "run" / "pseudo_labels.json").read_text())
    assert summary["teachers"] == [{"ref": parent.ref, "weights_sha256": parent.sha256}]
    assert sorted(summary["cases"]) == ["vb0", "vb1"]
    prov = read_package(r.package.path).manifest["training"]
    assert prov["pseudo_labels"]["teachers"][0]["weights_sha256"] == parent.sha256
    assert prov["pseudo_labels"]["cases"] == ["vb0", "vb1"]
    # the same drafts again come from the run's cache, not from the teacher
    monkeypatch.setattr(pseudo, "draft_case", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    data = load_dataset(cases, STARTER)
    pseudo.add_pseudo_labels(data, cases, [str(parent.path)], STARTER, (1.0, 1.0), threshold=0.8,
                             cache_dir=tmp_path / "run" / "pseudo")
    assert bool(data[0].annotated[STARTER.channel_of()["intervertebral_disc"]])
