"""Blending a fine-tune with its parent (``training.wise``): the line between two sets of weights.

Checked on tiny real models: the ends of the line are the two models, a midpoint is the mean, class-score
rows meet by class id (a class only the fine-tune has keeps its row), unrelated models are refused, and a
fine-tune with ``wise`` < 1 writes the blend as its package and keeps the fine-tune beside it.
"""
import json

import pytest
import torch

from conftest import make_package
from LumbarSegmentLib.core.schema import load_schema
from LumbarSegmentLib.registry.package import read_package
from LumbarSegmentLib.training.wise import blend, blend_state, write_blend


def test_blend_state_ends_and_midpoint():
    child = {"w": torch.ones(2, 3), "n": torch.tensor(7)}
    parent = {"w": torch.zeros(2, 3), "n": torch.tensor(1)}
    ids = (("a", "b"), ("a", "b"))
    assert torch.equal(blend_state(child, parent, ids, 1.0)["w"], child["w"])
    assert torch.equal(blend_state(child, parent, ids, 0.0)["w"], parent["w"])
    mid = blend_state(child, parent, ids, 0.25)
    assert torch.allclose(mid["w"], torch.full((2, 3), 0.25)) and int(mid["n"]) == 7, "counters stay the child's"


def test_class_rows_meet_by_id_and_a_new_class_keeps_its_row():
    child = {"head.weight": torch.tensor([[1.0], [2.0], [3.0]])}  # classes bg, disc, sacrum
    parent = {"head.weight": torch.tensor([[0.0], [10.0]])}  # classes disc, bg (another order)
    out = blend_state(child, parent, (("bg", "disc", "sacrum"), ("disc", "bg")), 0.5, {"head.weight"})
    assert out["head.weight"].flatten().tolist() == [5.5, 1.0, 3.0]


def test_unrelated_shapes_are_refused():
    with pytest.raises(ValueError, match="only a fine-tune"):
        blend_state({"w": torch.ones(2)}, {"w": torch.ones(3)}, (("a",), ("a",)), 0.5)


def test_blend_of_two_packages_and_its_record(tmp_path):
    parent = make_package(tmp_path / "p", seed=0)
    child = make_package(tmp_path / "c", seed=1)
    model, schema = blend(child, parent, 0.5)
    pm, cm = parent.load_model("cpu").state_dict(), child.load_model("cpu").state_dict()
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v, (pm[k].float() + cm[k].float()) / 2, atol=2e-3), k
    pkg = write_blend(child, parent, 0.5, tmp_path / "out")
    rec = pkg.manifest["training"]["interpolated"]
    assert (rec["alpha"], rec["child_sha256"], rec["parent_sha256"]) == (0.5, child.sha256, parent.sha256)
    narrowed = write_blend(make_package(tmp_path / "c6", schema="spine6", seed=1), parent, 0.5, tmp_path / "o6",
                           schema=load_schema("starter"))
    assert narrowed.schema.ids == load_schema("starter").ids
    with pytest.raises(ValueError, match="0 to 1"):
        blend(child, parent, 1.5)


def test_finetune_with_wise_writes_the_blend_and_keeps_the_fine_tune(tmp_path):
    import numpy as np

    from LumbarSegmentLib.core.volume import Volume
    from LumbarSegmentLib.dataset.cases import list_cases, write_case
    from LumbarSegmentLib.training.config import TrainConfig
    from LumbarSegmentLib.training.finetune import finetune
    from LumbarSegmentLib.training.retention import RetentionSettings

    parent = make_package(tmp_path / "parent")
    img = Volume(np.random.default_rng(0).integers(20, 80, (40, 40, 2)).astype(np.int16))
    lab = np.zeros((40, 40, 2), np.uint8)
    lab[10:30, 10:30, :] = 1
    write_case(tmp_path / "team", "T1L_0", img, img.with_array(lab), labels={1: "vertebral_body"},
               annotated_structures=["vertebral_body"])
    cfg = TrainConfig(epochs=1, steps_per_epoch=2, batch_size=2, patch=32, augment=False, threads=1, device="cpu",
                      precision="fp32", patience=0, warmup_steps=0, lr=1e-2)
    r = finetune(parent, list_cases(tmp_path / "team"), out_dir=tmp_path / "run", config=cfg,
                 retention=RetentionSettings(wise=0.5))
    run = tmp_path / "run"
    assert r.package.path == run / "package" and (run / "package-finetuned" / "manifest.json").is_file()
    tuned = read_package(run / "package-finetuned")
    assert r.package.manifest["training"]["interpolated"]["child_sha256"] == tuned.sha256
    assert r.package.manifest["training"]["init_from"]["retention"]["wise"] == 0.5
    assert json.loads((run / "package" / "manifest.json").read_text())["parent"]["sha256"] == parent.sha256
    w_parent = parent.load_model("cpu").state_dict()
    w_tuned, w_blend = tuned.load_model("cpu").state_dict(), r.package.load_model("cpu").state_dict()
    k = next(k for k, v in w_tuned.items() if v.is_floating_point() and not torch.equal(v, w_parent[k]))
    assert torch.allclose(w_blend[k].float(), (w_tuned[k].float() + w_parent[k].float()) / 2, atol=2e-3)
