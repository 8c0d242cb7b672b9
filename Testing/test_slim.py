"""A narrower copy of a trained U-Net (models.slim) and the fine-tune that distils into it."""
from __future__ import annotations

import pytest
import torch

from LumbarSegmentLib.core.schema import load_schema
from LumbarSegmentLib.models import build_model
from LumbarSegmentLib.models.slim import slim_model
from LumbarSegmentLib.registry.package import write_package
from LumbarSegmentLib.training.config import TrainConfig
from LumbarSegmentLib.training.finetune import finetune
from LumbarSegmentLib.training.retention import RetentionSettings
from LumbarSegmentLib.training.run_outputs import CachedSlices

from test_slice_context import TINY, _synth_cases

STARTER = load_schema("starter")


def _silence_all_but(model, width_of_slim: int, seed: int = 0):
    """Give the channels a slim copy must keep a large BatchNorm scale and switch every other channel
    off (scale and shift 0: it outputs 0 and contributes nothing downstream); returns what was kept per BN."""
    gen = torch.Generator().manual_seed(seed)
    kept = {}
    f = model.spec.init_filters
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features * width_of_slim // f
                chosen = torch.sort(torch.randperm(m.num_features, generator=gen)[:n]).values
                off = torch.ones(m.num_features, dtype=torch.bool)
                off[chosen] = False
                m.weight[off], m.bias[off] = 0.0, 0.0
                m.weight[~off] = 1.0 + torch.rand(n, generator=gen)
                m.running_mean.uniform_(-0.2, 0.2, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
                kept[name] = chosen
    return kept


@pytest.mark.parametrize("variant", ["UVD", "UD"])
def test_slim_copy_computes_what_the_wide_model_computes_when_the_dropped_channels_are_silent(variant):
    torch.manual_seed(0)
    wide = build_model(variant, num_classes=3, init_filters=8, activation="prelu").eval()
    kept = _silence_all_but(wide, 4)
    slim = slim_model(wide, 4).eval()
    assert slim.builder_args == dict(wide.builder_args, init_filters=4)
    assert list(slim.encoder.widths) == [w // 2 for w in wide.encoder.widths]
    # the copy holds the chosen channels' own weights
    assert torch.equal(slim.encoder.stages[0][0][1].weight, wide.encoder.stages[0][0][1].weight[kept["encoder.stages.0.0.1"]])
    x = torch.randn(2, 1, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(slim(x), wide(x), atol=2e-4, rtol=1e-4)
    slim.train()
    main, aux = slim(x)
    assert main.shape == (2, 3, 64, 48) and len(aux) == len(wide.aux_heads)


def test_slim_keeps_the_channels_of_largest_scale_and_leaves_the_source_alone():
    torch.manual_seed(1)
    wide = build_model("UVD", num_classes=3, init_filters=8).eval()
    before = {k: v.clone() for k, v in wide.state_dict().items()}
    bn = wide.encoder.stages[0][0][1]
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.1, -3.0, 0.2, 2.0, 0.3, 0.05, -1.5, 1.0]))
    slim = slim_model(wide, 4)
    assert torch.equal(slim.encoder.stages[0][0][1].weight, torch.tensor([-3.0, 2.0, -1.5, 1.0]))
    assert all(torch.equal(before[k], v) or k == "encoder.stages.0.0.1.weight" for k, v in wide.state_dict().items())


@pytest.mark.parametrize("variant,width,match", [("UMD", 4, "plain conv blocks"), ("UVAD", 4, "attention"),
                                                 ("UVD", 8, "narrower"), ("UVD", 0, "narrower")])
def test_slim_refuses_what_it_cannot_copy(variant, width, match):
    with pytest.raises(ValueError, match=match):
        slim_model(build_model(variant, num_classes=3, init_filters=8), width)


def _parent(tmp_path):
    torch.manual_seed(0)
    return write_package(tmp_path / "parent", build_model("UD", num_classes=3, init_filters=4).eval(),
                         name="parent", schema=STARTER)


def test_a_slimmed_fine_tune_writes_a_narrow_package_taught_by_the_wide_parent(tmp_path):
    parent = _parent(tmp_path)
    r = finetune(parent, [], [], out_dir=tmp_path / "ft", config=TrainConfig(**TINY, slim_width=2),
                 retention=RetentionSettings(distill=1.0), slices=CachedSlices(_synth_cases(), _synth_cases(1)))
    arch = r.package.manifest["architecture"]
    assert arch["init_filters"] == 2 and arch["variant"] == "UD"
    record = r.package.manifest["training"]["init_from"]
    assert record["slimmed"] == {"from_width": 4, "width": 2, "teacher": parent.ref}
    assert record["retention"]["distill"] == 1.0
    assert r.package.load_model("cpu").encoder.widths[0] == 2


def test_a_slimmed_fine_tune_cannot_be_blended_and_writes_nothing(tmp_path):
    parent = _parent(tmp_path)
    with pytest.raises(ValueError, match="--wise 1"):
        finetune(parent, [], [], out_dir=tmp_path / "ft", config=TrainConfig(**TINY, slim_width=2),
                 retention=RetentionSettings(distill=1.0, wise=0.5),
                 slices=CachedSlices(_synth_cases(), _synth_cases(1)))
    with pytest.raises(ValueError, match="narrower"):
        finetune(parent, [], [], out_dir=tmp_path / "ft", config=TrainConfig(**TINY, slim_width=4),
                 retention=RetentionSettings(distill=1.0), slices=CachedSlices(_synth_cases(), _synth_cases(1)))
    assert not (tmp_path / "ft").exists()


def test_the_slim_teacher_is_the_wide_parent_in_the_distillation():
    from LumbarSegmentLib.training.retention import Retention

    wide = build_model("UD", num_classes=3, init_filters=4)
    narrow = slim_model(wide, 2)
    r = Retention(RetentionSettings(distill=1.0), narrow, wide)
    assert r.teacher.encoder.widths[0] == 4 and not r.teacher.training
    assert all(not p.requires_grad for p in r.teacher.parameters())


def test_a_named_teacher_teaches_instead_of_the_parent_and_must_know_the_same_classes(tmp_path):
    parent = _parent(tmp_path)
    torch.manual_seed(3)
    wide = write_package(tmp_path / "wide", build_model("UD", num_classes=3, init_filters=8).eval(),
                         name="wide", schema=STARTER)
    r = finetune(parent, [], [], out_dir=tmp_path / "ft", config=TrainConfig(**TINY),
                 retention=RetentionSettings(distill=1.0, teacher=wide), slices=CachedSlices(_synth_cases(), _synth_cases(1)))
    assert r.package.manifest["training"]["init_from"]["teacher"]["package"] == wide.ref
    slimmed = finetune(parent, [], [], out_dir=tmp_path / "ft-slim", config=TrainConfig(**TINY, slim_width=2),
                       retention=RetentionSettings(distill=1.0, teacher=wide),
                       slices=CachedSlices(_synth_cases(), _synth_cases(1)))
    assert slimmed.package.manifest["training"]["init_from"]["slimmed"]["teacher"] == wide.ref  # who taught
    other = write_package(tmp_path / "other", build_model("UD", num_classes=6, init_filters=4).eval(),
                          name="other", schema=load_schema("spine6"))
    with pytest.raises(ValueError, match="same classes"):
        finetune(parent, [], [], out_dir=tmp_path / "ft2", config=TrainConfig(**TINY),
                 retention=RetentionSettings(distill=1.0, teacher=other), slices=CachedSlices(_synth_cases(), _synth_cases(1)))
    assert not (tmp_path / "ft2").exists()


def test_a_teacher_of_some_classes_teaches_those_and_the_parent_the_rest():
    from LumbarSegmentLib.training.retention import mix_teachers

    teacher = torch.zeros(1, 3, 1, 1)
    teacher[0, 1] = 6.0  # the teacher: class 1
    parent = torch.zeros(1, 3, 1, 1)
    parent[0, 2] = 6.0  # the parent: class 2
    both = torch.softmax(mix_teachers(teacher, parent, (1,)), 1)[0, :, 0, 0]
    assert float(both[1]) > 0.45 and float(both[2]) > 0.45, "each is sure of the class it teaches: half each"
    neither = torch.softmax(mix_teachers(teacher, parent, (2,)), 1)[0, :, 0, 0]
    assert float(neither.max()) < 0.34, "each doubts the class it teaches: no class stands out"
    agree = torch.softmax(mix_teachers(parent, parent, (1,)), 1)[0, :, 0, 0]
    assert float(agree[2]) > 0.99
    assert torch.allclose(torch.softmax(mix_teachers(teacher, parent, (0, 1, 2)), 1), torch.softmax(teacher, 1))


def test_teacher_classes_are_recorded_and_refused_without_a_teacher_or_with_an_unknown_class(tmp_path):
    from LumbarSegmentLib.training.retention import Retention

    parent = _parent(tmp_path)
    torch.manual_seed(3)
    wide = write_package(tmp_path / "wide", build_model("UD", num_classes=3, init_filters=8).eval(),
                         name="wide", schema=STARTER)
    slices = CachedSlices(_synth_cases(), _synth_cases(1))
    r = finetune(parent, [], [], out_dir=tmp_path / "ft", config=TrainConfig(**TINY, teacher_classes=("intervertebral_disc",)),
                 retention=RetentionSettings(distill=1.0, teacher=wide), slices=slices)
    assert r.package.manifest["training"]["init_from"]["teacher"]["classes"] == ["intervertebral_disc"]
    for kw, keep, match in ((("nerve_root",), RetentionSettings(distill=1.0, teacher=wide), "no class 'nerve_root'"),
                            (("intervertebral_disc",), RetentionSettings(distill=1.0), "needs --teacher")):
        with pytest.raises(ValueError, match=match):
            finetune(parent, [], [], out_dir=tmp_path / "bad", config=TrainConfig(**TINY, teacher_classes=kw),
                     retention=keep, slices=slices)
        assert not (tmp_path / "bad").exists()
    model = build_model("UD", num_classes=3, init_filters=4)
    mixed = Retention(RetentionSettings(distill=1.0, teacher_channels=(2,)), model, wide.load_model("cpu"))
    assert mixed.parent is not None and mixed.teacher.encoder.widths[0] == 8 and not mixed.parent.training
    assert Retention(RetentionSettings(distill=1.0), model, wide.load_model("cpu")).parent is None
