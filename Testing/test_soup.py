"""Weight averaging of fine-tunes (``training.soup``, ``lumbarseg-train soup``): the average is exact,
its provenance keeps every ingredient's training cases, and unrelated models are refused."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from LumbarSegmentLib.models import build_model
from LumbarSegmentLib.registry.packages import PackageError, read_package, write_package
from LumbarSegmentLib.core.schema import load_schema
from LumbarSegmentLib.training.cli import main as train_main
from LumbarSegmentLib.training.evaluate import training_lineage
from LumbarSegmentLib.training.soup import soup

STARTER = load_schema("starter")


def _entry(case, image="a" * 64):
    return {"case": case, "version": 1, "patient": case, "annotated_structures": ["vertebral_body"],
            "image_sha256": image, "label_sha256": "b" * 64}


def _fine_tune(folder, parent, seed, cases, *, filters=4, image="a" * 64):
    """A package that says it was fine-tuned from ``parent`` on ``cases`` (random weights per seed)."""
    torch.manual_seed(seed)
    m = build_model("UD", num_classes=3, init_filters=filters).eval()
    with torch.no_grad():
        for t in m.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn_like(t) * 0.1)
    training = {"train_cases": list(cases), "val_cases": ["V1"],
                "data_manifest": [_entry(c, image) for c in cases]}
    return write_package(folder, m, name="tiny", version=seed + 1, schema=STARTER, training=training,
                         parent={"ref": parent.ref, "sha256": parent.sha256} if parent is not None else None)


@pytest.fixture()
def family(tmp_path):
    torch.manual_seed(0)
    base = write_package(tmp_path / "base", build_model("UD", num_classes=3, init_filters=4).eval(),
                         name="tiny", schema=STARTER, training={"train_cases": ["A"]})
    a = _fine_tune(tmp_path / "a", base, 1, ["A", "B"])
    b = _fine_tune(tmp_path / "b", base, 2, ["A", "C"])
    return base, a, b


def test_soup_is_the_weighted_average_and_keeps_every_ingredients_cases(tmp_path, family):
    base, a, b = family
    out = soup([a, b], tmp_path / "s", name="tiny-soup", weights=[3, 1], half=False)
    wa, wb, ws = (load_file(str(p.path / "weights.safetensors")) for p in (a, b, out))
    for k, v in ws.items():
        if v.is_floating_point():
            want = 0.75 * wa[k].float() + 0.25 * wb[k].float()
            assert torch.allclose(v.float(), want, atol=1e-3), k
        else:
            assert torch.equal(v, wa[k]), k
    tr = out.manifest["training"]
    assert [i["weight"] for i in tr["soup"]] == [0.75, 0.25]
    assert [i["sha256"] for i in tr["soup"]] == [a.sha256, b.sha256]
    assert tr["train_cases"] == ["A", "B", "C"]
    assert [e["case"] for e in tr["data_manifest"]] == ["A", "B", "C"]
    assert tr["val_cases"] == ["V1"]
    assert out.parent == {"ref": base.ref, "sha256": base.sha256}
    # a case that only one ingredient trained on is still a seen case for the soup
    assert {"B", "C"} <= training_lineage(read_package(out.path))[0]
    read_package(out.path).load_model()  # sealed, checksummed, loadable


def test_soup_runs_at_one_models_cost(tmp_path, family):
    _, a, b = family
    out = soup([a, b], tmp_path / "s", name="tiny-soup", half=False)
    x = torch.randn(1, 1, 32, 32)
    ya, ys = (p.load_model()(x) for p in (a, out))
    ys = ys[0] if isinstance(ys, (list, tuple)) else ys
    assert ys.shape == (ya[0] if isinstance(ya, (list, tuple)) else ya).shape
    assert sum(t.numel() for t in out.load_model().parameters()) == sum(t.numel() for t in a.load_model().parameters())


def test_a_parent_and_its_fine_tune_may_be_averaged(tmp_path, family):
    base, a, _ = family
    out = soup([base, a], tmp_path / "s", name="tiny-wise")
    assert out.parent["sha256"] == base.sha256
    # a package given twice shares itself and its parent with itself: the parent is named, never itself
    twice = soup([a, a], tmp_path / "s2", name="tiny-twice")
    assert twice.parent == {"ref": base.ref, "sha256": base.sha256}


def test_unrelated_models_are_refused_with_advice(tmp_path, family):
    _, a, _ = family
    stranger = _fine_tune(tmp_path / "x", None, 5, ["D"])
    with pytest.raises(PackageError, match="ensemble"):
        soup([a, stranger], tmp_path / "s", name="bad")
    assert not (tmp_path / "s").exists()


def test_other_architecture_or_conflicting_data_is_refused(tmp_path, family):
    base, a, _ = family
    wide = _fine_tune(tmp_path / "w", base, 3, ["D"], filters=8)
    with pytest.raises(PackageError, match="architectures differ"):
        soup([a, wide], tmp_path / "s1", name="bad")
    other_data = _fine_tune(tmp_path / "o", base, 4, ["A"], image="c" * 64)
    with pytest.raises(PackageError, match="case A was trained with different files"):
        soup([a, other_data], tmp_path / "s2", name="bad")
    for w, msg in (([1], "1 weights for 2"), ([1, -1], "positive"), ([1, float("nan")], "positive"), ([1, float("inf")], "positive")):
        with pytest.raises(PackageError, match=msg):
            soup([a, a], tmp_path / "s3", name="bad", weights=w)
    with pytest.raises(PackageError, match="at least two"):
        soup([a], tmp_path / "s4", name="bad")
    assert not any((tmp_path / n).exists() for n in ("s1", "s2", "s3", "s4"))


def test_cli_writes_the_soup_and_refuses_bad_input_without_touching_anything(tmp_path, family, capsys):
    _, a, b = family
    before = {p: (p / "manifest.json").read_bytes() for p in (a.path, b.path)}
    assert train_main(["soup", f"{a.path},{b.path}", "--out", str(tmp_path / "s"), "--name", "tiny-soup"]) == 0
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["name"] == "tiny-soup" and m["training"]["command"].startswith("lumbarseg-train ")
    assert train_main(["soup", f"{a.path},{b.path}", "--out", str(tmp_path / "bad"), "--weights", "1,x"]) == 2
    assert "--weights" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    # the output folder of an ingredient is never written over
    assert train_main(["soup", f"{a.path},{b.path}", "--out", str(a.path)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert before == {p: (p / "manifest.json").read_bytes() for p in (a.path, b.path)}


def test_a_bad_package_name_is_refused_before_anything_is_written(tmp_path, family, capsys):
    """``write_package`` (behind soup, export and every training run) checks the name first: a name the
    manifest would refuse used to leave a half-made package folder behind."""
    _, a, b = family
    assert train_main(["soup", f"{a.path},{b.path}", "--out", str(tmp_path / "s"), "--name", "../bad name"]) == 2
    assert "is not allowed" in capsys.readouterr().err
    with pytest.raises(ValueError, match="is not allowed"):
        write_package(tmp_path / "w", build_model("UD", num_classes=3, init_filters=4), name="a/b", schema=STARTER)
    assert not (tmp_path / "s").exists() and not (tmp_path / "w").exists()


def test_lineage_follows_a_parent_ref_only_to_the_weights_the_child_recorded(tmp_path, family):
    """A run folder's package is named like a published model; its child must not inherit the
    training cases of the published model of that name, only say that its ancestor is unknown."""
    from LumbarSegmentLib.registry.packages import Registry

    base, a, _ = family
    reg = Registry(tmp_path / "reg")
    reg.publish(base)  # the registry's tiny@1: trained on A
    imposter = _fine_tune(tmp_path / "run", base, 7, ["Z"])  # a run folder's package...
    child = write_package(tmp_path / "child", build_model("UD", num_classes=3, init_filters=4).eval(), name="tiny",
                          schema=STARTER, training={"train_cases": ["Q"]},
                          parent={"ref": "tiny@1", "sha256": imposter.sha256})  # ...recorded by its name only
    seen, missing = training_lineage(read_package(child.path), [reg])
    assert seen == {"Q"} and len(missing) == 1 and "other weights" in missing[0]
    honest = write_package(tmp_path / "honest", build_model("UD", num_classes=3, init_filters=4).eval(), name="tiny",
                           schema=STARTER, training={"train_cases": ["Q"]},
                           parent={"ref": "tiny@1", "sha256": reg.get("tiny@1").sha256})
    assert training_lineage(read_package(honest.path), [reg]) == ({"Q", "A"}, [])
