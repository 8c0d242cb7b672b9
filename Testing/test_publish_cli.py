"""``lumbarseg-train publish`` shows the gate's per-class comparison, then its decision, on stdout.

A person deciding whether to trust a promoted (or refused) model reads that table; the gate's
mean alone hides a class that got worse. The packages are two fixed "one class everywhere"
models on synthetic cases, so the outcome of each comparison is known in advance.
"""
from __future__ import annotations

from LumbarSegmentLib.registry.registry import Registry
from LumbarSegmentLib.training.cli import main

from test_training_run import _tiny_package, write_synthetic_dataset


def test_publish_prints_the_per_class_table_and_the_decision(tmp_path, capsys):
    data = tmp_path / "data"
    ids = write_synthetic_dataset(data, n_cases=2, size=40)
    bad = _tiny_package(tmp_path / "bad", "bad", bias=[10.0, 0.0, 0.0])  # background everywhere: Dice 0
    good = _tiny_package(tmp_path / "good", "good", bias=[0.0, 0.0, 10.0])  # disc everywhere: some overlap
    reg = tmp_path / "registry"
    common = ["--registry", str(reg), "--data", str(data), "--cases", ",".join(ids), "--device", "cpu"]

    assert main(["publish", str(bad.path), *common]) == 0  # the first model: no comparison, default
    capsys.readouterr()

    assert main(["publish", str(good.path), *common]) == 0
    out = capsys.readouterr().out
    head, _, decision = out.rpartition("published ")
    for words in ("class", "in use", "candidate", "change", "Vertebral body", "Intervertebral disc",
                  "mean Dice (foreground)", "in use: bad@1"):
        assert words in head, (words, out)  # the table comes before the decision line
    assert "good@1" in decision and "it is now the default" in decision, out
    assert Registry(reg).default_ref() == "good@1"

    assert main(["publish", str(bad.path), *common]) == 0
    out = capsys.readouterr().out
    assert "Intervertebral disc" in out and "in use: good@1" in out
    assert "the model in use is unchanged" in out and ">=" not in out.splitlines()[-1], out
    assert Registry(reg).default_ref() == "good@1"


def test_the_command_lines_gate_settings_reach_one_frozen_policy(tmp_path, publish_spy):
    """Every gate flag lands in the GatePolicy the gate reads; the old ``--amp off`` arrives as the
    precision name the rest of the project uses (fp32), and a negative drop switches that check off."""
    import dataclasses

    import pytest

    seen = publish_spy
    assert main(["publish", str(tmp_path), "--registry", str(tmp_path / "reg"), "--amp", "off", "--device", "cpu",
                 "--metric", "level_range_dice", "--max-source-drop", "-1", "--no-default", "--force",
                 "--name", "team"]) == 0
    p = seen["policy"]
    assert (p.precision, p.device, p.metric, p.max_drop, p.never_default, p.force, p.own_source_only) == (
        "fp32", "cpu", "level_range_dice", None, True, True, False)
    assert seen["name"] == "team" and seen["cases"] is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.force = False
