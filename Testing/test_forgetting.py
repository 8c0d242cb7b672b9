"""A fine-tune keeps what its parent knew, and the publish gate sees what a team does not.

Fast: tiny models and synthetic data. The guards (``training.retention``): BatchNorm statistics
stay the parent's, the L2-SP term pulls towards the parent, distillation counts only where the
labels say nothing. The gate (``training.publish`` with ``training.reference``): a candidate that
loses a reference source is refused unless ``--own-source-only``, which the published manifest
records and ``lumbarseg models`` shows.
"""
import json

import numpy as np
import pytest
import torch

from conftest import make_package
from LumbarSegmentLib.dataset.cases import list_cases, write_case
from LumbarSegmentLib.models import build_model
from LumbarSegmentLib.registry.catalog import Catalog
from LumbarSegmentLib.registry.registry import Registry
from LumbarSegmentLib.registry.package import read_package
from LumbarSegmentLib.training.config import TrainConfig
from LumbarSegmentLib.training.data import CaseSlices, IGNORE_INDEX
from LumbarSegmentLib.training.retention import (Retention, RetentionSettings, distill_loss, freeze_bn_stats,
                                                 l2sp_penalty)
from LumbarSegmentLib.core.volume import Volume


def _tiny(seed=0):
    torch.manual_seed(seed)
    return build_model("UVD", num_classes=3, init_filters=4)


def _slices(n=2, size=48, seed=0):
    """Synthetic cases: a bright box (vertebral body) on a noisy background, bodies annotated."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        img = torch.randn(2, size, size, generator=g) * 0.3 + 2.0 * i  # a contrast of its own per case
        lab = torch.zeros(2, size, size, dtype=torch.uint8)
        lab[:, 12:30, 14:34] = 1
        img[lab.bool()] += 2.0
        out.append(CaseSlices(case_id=f"s{i}", patient=f"s{i}", image=img, label=lab,
                              annotated=torch.tensor([True, True, False]), structures=("vertebral_body",),
                              fg_slices=[0, 1], source="T1L"))
    return out


def _fine_tune(tmp_path, model, **retention):
    from LumbarSegmentLib.training.run_outputs import CachedSlices, RunOutputs, StartFrom
    from LumbarSegmentLib.training.trainer import train

    cfg = TrainConfig(variant="UVD", init_filters=4, epochs=1, steps_per_epoch=3, batch_size=2, patch=32,
                      lr=1e-2, warmup_steps=0, augment=False, threads=1, device="cpu", precision="fp32",
                      patience=0, **retention)
    return train(cfg, [], [], out_dir=tmp_path, start=StartFrom(model), slices=CachedSlices(_slices()),
                 outputs=RunOutputs(write_package=False))


def _bn_stats(model):
    return {n: b.clone() for n, b in model.named_buffers() if "running_" in n}


@pytest.mark.parametrize("keep", [True, False])
def test_bn_statistics_stay_the_parents_when_kept(tmp_path, keep):
    model = _tiny()
    before = _bn_stats(model)
    assert before, "the tiny model has BatchNorm layers"
    _fine_tune(tmp_path, model, keep_bn_stats=keep)
    after = _bn_stats(model)
    same = all(torch.equal(before[n], after[n]) for n in before)
    assert same is keep, "kept: not one running statistic moved; not kept: they follow the new cases"


def test_freeze_bn_stats_puts_only_batchnorm_in_eval_mode():
    model = _tiny().train()
    n = freeze_bn_stats(model)
    assert n > 0
    assert all(not m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert model.training, "the rest (e.g. deep supervision outputs) stays in training mode"


def test_l2sp_penalty_is_the_squared_distance_to_the_parent():
    model = _tiny()
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert float(l2sp_penalty(model, anchor).detach()) == 0.0
    with torch.no_grad():
        first = next(model.parameters())
        first.add_(0.5)
    assert float(l2sp_penalty(model, anchor).detach()) == pytest.approx(0.25 * first.numel(), rel=1e-5)
    loss = l2sp_penalty(model, anchor)
    loss.backward()
    assert torch.allclose(first.grad, torch.full_like(first, 1.0)), "gradient 2 (w - w_parent) points back"


def test_l2sp_keeps_a_fine_tune_closer_to_its_parent(tmp_path):
    def distance(**kw):
        model = _tiny()
        parent = {n: p.detach().clone() for n, p in model.named_parameters()}
        _fine_tune(tmp_path / str(kw), model, **kw)
        return float(l2sp_penalty(model, parent).detach())

    free, pulled = distance(l2sp=0.0), distance(l2sp=100.0)
    assert free > 0
    assert pulled < 0.5 * free, (free, pulled)


def test_distillation_counts_only_pixels_the_labels_leave_open():
    teacher = torch.zeros(1, 3, 2, 2)
    teacher[0, 0] = 5.0  # the parent says background everywhere
    student = torch.zeros(1, 3, 2, 2)
    student[0, 1] = 5.0  # the model says vertebral body everywhere
    labelled = torch.ones(1, 2, 2, dtype=torch.long)
    assert float(distill_loss(student, teacher, labelled)) == 0.0, "labelled pixels: the label decides"
    free = torch.tensor([[[0, IGNORE_INDEX], [1, 1]]])
    assert float(distill_loss(student, teacher, free)) > 1.0
    assert float(distill_loss(teacher, teacher, free)) == pytest.approx(0.0, abs=1e-6)
    assert float(distill_loss(student, teacher, labelled, everywhere=True)) > 1.0, "a student copies labelled pixels too"


def test_retention_penalty_is_none_without_a_loss_guard_and_distills_from_the_start():
    model = _tiny()
    assert Retention(RetentionSettings(keep_bn_stats=True), model).penalty(model, None, None, None, None) is None
    ret = Retention(RetentionSettings(distill=1.0), model)
    x = torch.randn(1, 1, 32, 32)
    y = torch.zeros(1, 32, 32, dtype=torch.long)
    model.eval()
    from contextlib import nullcontext

    assert float(ret.penalty(model, x, y, model(x), nullcontext).detach()) == pytest.approx(0.0, abs=1e-6)


def test_finetune_command_line_defaults_and_plain_finetune():
    from LumbarSegmentLib.training.cli import build_parser
    from LumbarSegmentLib.training.finetune import RETENTION_DEFAULT, retention_from_args

    p = build_parser()
    base = ["finetune", "--from", "x", "--data", "d", "--out", "o"]
    assert retention_from_args(p.parse_args(base)) == RETENTION_DEFAULT
    assert RETENTION_DEFAULT.active, "a fine-tune keeps what the parent knew by default"
    assert retention_from_args(p.parse_args(base + ["--plain-finetune"])) == RetentionSettings()
    r = retention_from_args(p.parse_args(base + ["--no-keep-bn-stats", "--l2sp", "0.5"]))
    assert (r.keep_bn_stats, r.l2sp, r.distill) == (False, 0.5, RETENTION_DEFAULT.distill)
    with pytest.raises(SystemExit):
        p.parse_args(base + ["--l2sp", "-1"])


# --------------------------------------------------------------------------------------------
# the gate
@pytest.fixture()
def registries(tmp_path):
    shipped = Registry(tmp_path / "shipped")
    shipped.publish(make_package(tmp_path / "src", name="uvd-tiny"), make_default=True, catalog=Catalog([shipped]))
    return Registry(tmp_path / "user"), Registry(tmp_path / "shipped", read_only=True)


def _with_head_bias(tmp_path, name, favoured: int, parent=None):
    """A tiny package that paints class channel ``favoured`` everywhere (head biases set), as a
    fine-tune of ``parent``."""
    from LumbarSegmentLib.registry.package import default_input_contract, write_package
    from LumbarSegmentLib.core.schema import load_schema

    model = _tiny()
    with torch.no_grad():
        for m in model.head_modules().values():
            m.bias.zero_()
            m.bias[favoured] = 50.0
    pkg = write_package(tmp_path / name, model.eval(), name="uvd-tiny", schema=load_schema("starter"),
                        input_contract=default_input_contract(spacing_mm=(1.0, 1.0)),
                        training={"train_cases": [], "val_cases": []})  # sealed provenance: the gate grades it
    if parent is not None:
        manifest = json.loads((pkg.path / "manifest.json").read_text())
        manifest["parent"] = {"ref": parent.ref, "sha256": parent.sha256}
        (pkg.path / "manifest.json").write_text(json.dumps(manifest))
    return read_package(pkg.path)


def _reference(folder, sources=("VB3", "IVD")):
    """One small case per source: a box of vertebral body (or disc) in a 3-slice stack."""
    img = Volume(np.random.default_rng(0).integers(20, 80, (24, 24, 3)).astype(np.int16))
    for i, src in enumerate(sources):
        lab = np.zeros((24, 24, 3), np.uint8)
        lab[6:18, 6:18, :] = 1
        structure = "intervertebral_disc" if src == "IVD" else "vertebral_body"
        write_case(folder, f"{src}_r{i}", img, img.with_array(lab), labels={1: structure},
                   annotated_structures=[structure], extra={"source": src})
    return list_cases(folder)


def test_gate_refuses_a_candidate_that_loses_a_reference_source(tmp_path, registries):
    """For real, through the engine: the model in use paints bodies, the candidate paints nothing."""
    from LumbarSegmentLib.training.publish import GatePolicy, publish_if_better

    user, shipped = registries
    in_use = _with_head_bias(tmp_path, "painter", 1)
    user.publish(in_use, make_default=True, catalog=Catalog([user, shipped]))
    current = Catalog([user, shipped]).default()
    forgetful = _with_head_bias(tmp_path, "forgetful", 0, parent=current)
    ref = _reference(tmp_path / "ref", ("VB3",))
    res = publish_if_better(forgetful, user, GatePolicy(min_cases=1), registries=[user, shipped], reference=ref,
                            cases=_reference(tmp_path / "heldout", ("T1L", "T1L")))
    r = res["comparison"]["reference"]
    assert r["per_source"]["VB3"]["vertebral_body"]["current"] > 0.5
    assert r["per_source"]["VB3"]["vertebral_body"]["candidate"] == 0.0
    assert r["lost"] and res["default"] is False, res["reason"]
    assert "on the reference set it loses more than 0.010 on VB3 vertebral_body" in res["reason"]
    assert "--own-source-only" in res["reason"]
    assert "ref VB3: " in res["table"]
    assert Catalog([user, shipped]).default_ref() == current.ref


class _Levels:
    """Stands in for evaluate_packages: level-range Dice per source chosen per model."""

    def __init__(self, levels):
        self.levels = levels

    def __call__(self, entries, cases, options=None, **kw):
        out = {}
        sources = {c.extra.get("source") for c in cases}
        for name in entries:
            lr = {s: v for s, v in self.levels[name].items() if s in sources}
            fg = {"vertebral_body": 0.8}
            out[name] = {"metrics": {"dice": fg, "iou": fg, "mean_dice_fg": 0.8}, "level_range": lr}
        return out


@pytest.mark.parametrize("own_source_only, drop, promoted", [(False, 0.05, False), (True, 0.05, True),
                                                             (False, 0.005, True)])
def test_own_source_only_promotes_and_is_recorded(tmp_path, registries, monkeypatch, capsys, own_source_only, drop,
                                                  promoted):
    from LumbarSegmentLib.cli import main as seg_cli
    from LumbarSegmentLib.training import evaluate, publish

    user, shipped = registries
    in_use = Catalog([user, shipped]).default()
    monkeypatch.setattr(evaluate, "evaluate_packages", _Levels({
        "current": {"VB3": {"vertebral_body": 0.88}, "IVD": {"vertebral_body": 0.91},
                    "T1L": {"vertebral_body": 0.89}},
        "candidate": {"VB3": {"vertebral_body": 0.88 - drop}, "IVD": {"vertebral_body": 0.91},
                      "T1L": {"vertebral_body": 0.95}}}))
    ft = _with_head_bias(tmp_path, "ft", 1, parent=in_use)
    ref = _reference(tmp_path / "ref")
    policy = publish.GatePolicy(force=False, min_cases=1, own_source_only=own_source_only)
    res = publish.publish_if_better(ft, user, policy, registries=[user, shipped], reference=ref,
                                    cases=_reference(tmp_path / "heldout", ("T1L", "T1L")))
    assert res["default"] is promoted, res["reason"]
    published = read_package(user.root / "uvd-tiny" / "2")
    record = published.manifest["publish"]
    assert record["own_source_only"] is own_source_only
    assert record["reference"]["per_source"]["VB3"]["vertebral_body"]["delta"] == pytest.approx(-drop)
    published.verify()  # the record lies outside the seal
    log = json.loads((user.root / "publish_log.jsonl").read_text().splitlines()[-1])
    assert log["own_source_only"] is own_source_only and "reference" in log["comparison"]
    monkeypatch.setenv("LUMBARSEG_HOME", str(tmp_path / "home"))
    monkeypatch.setattr("LumbarSegmentLib.registry.catalog.default_registries", lambda: [user, shipped])
    seg_cli.main(["models"])
    shown = [line for line in capsys.readouterr().out.splitlines() if line.startswith("uvd-tiny@2")]
    assert shown and (("own source only" in shown[0]) is own_source_only), shown


def test_publish_command_line_passes_own_source_only_and_the_reference(tmp_path, publish_spy):
    from LumbarSegmentLib.training import cli

    seen = publish_spy
    ref = _reference(tmp_path / "ref")
    assert cli.main(["publish", str(tmp_path), "--registry", str(tmp_path / "reg"), "--own-source-only",
                     "--reference", str(tmp_path / "ref")]) == 0
    assert seen["policy"].own_source_only is True and [c.case_id for c in seen["reference"]] == [c.case_id for c in ref]
    assert seen["policy"].reference_drop == pytest.approx(0.01)


def test_shipped_reference_set_covers_every_validated_source():
    from LumbarSegmentLib.training.reference import reference_cases, reference_root, sources_of

    cases = reference_cases()
    if not cases:
        pytest.skip(f"no reference set in {reference_root()}")
    assert set(sources_of(cases)) >= {"IVD", "VB1", "VB2", "VB3", "SP", "T1L"}
    size = sum(p.stat().st_size for p in reference_root().iterdir())
    assert size < 4 * 2**20, "the shipped reference stays small"
    assert (reference_root() / "PROVENANCE.md").is_file()


# --------------------------------------------------------------------------------------------
def test_t1_levels_adapter_crops_the_unlabelled_rows_above_l1(tmp_path):
    from LumbarSegmentLib.training.sources import T1_TOP_MARGIN, t1_levels_case

    arr = np.zeros((40, 32, 1), np.uint8)
    arr[5:10, 8:20, 0] = 6  # S1
    arr[12:30, 8:20, 0] = 1  # a body
    img = Volume(np.arange(40 * 32, dtype=np.int16).reshape(40, 32, 1), spacing=(1.0, 1.1, 1.1))
    src = write_case(tmp_path / "src", "T1L_9", img, img.with_array(arr), labels={1: "vertebral_body", 6: "sacrum"},
                     annotated_structures=["vertebral_body", "sacrum"], extra={"labels_complete_z_range": [5, 29]})
    before = (tmp_path / "src" / src.image_path.name).read_bytes()
    case = t1_levels_case(src.json_path, tmp_path / "out", keep_sacrum=True)
    image, label = case.load()
    assert image.array.shape == (30 + T1_TOP_MARGIN, 32, 1)
    assert np.array_equal(image.array, img.array[:30 + T1_TOP_MARGIN]) and image.origin == img.origin
    assert case.extra["source"] == "T1L" and case.labels[6] == "sacrum"
    ignored = t1_levels_case(src.json_path, tmp_path / "out3")  # a schema without sacrum: S1 not seen
    image, label = ignored.load()
    lo = 12 - T1_TOP_MARGIN
    assert image.array.shape[0] == 30 + T1_TOP_MARGIN - lo and np.array_equal(image.array, img.array[lo:30 + T1_TOP_MARGIN])
    assert image.origin[2] == pytest.approx(lo * 1.1) and set(np.unique(label.array)) == {0, 1}
    assert ignored.labels == {1: "vertebral_body"} and ignored.annotated_structures == ["vertebral_body"]
    assert (tmp_path / "src" / src.image_path.name).read_bytes() == before, "the input is never modified"
