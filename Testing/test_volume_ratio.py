"""``scripts/volume_ratio.py`` (where a model's errors are) must report what the engine predicts.

Runs the script on one real case with the shipped default and checks its Dice against the
evaluation module's own level-range score of the same prediction, and that its volume ratio is
predicted / true voxels inside the level range (so a model that paints too much reads > 1).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import load_script

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "volume_ratio.py"


def _load():
    return load_script(SCRIPT, "lumbarseg_volume_ratio")


def test_volume_ratio_reports_the_engines_level_range_dice(shared_data, capsys):
    from LumbarSegmentLib.inference.engine import LoadedModel
    from LumbarSegmentLib.registry.packages import Registry, resolve_model
    from LumbarSegmentLib.training import evaluate as ev
    from LumbarSegmentLib.training.data import select_cases

    data = shared_data / "lumbar-mr"
    assert _load().main(["--model", "uvd-starter@4", "--cases", "VB3_04", "--data", str(data)]) == 0
    out = capsys.readouterr().out
    row = re.search(r"\| VB3_04 \| vertebral_body \| ([0-9.]+) \| ([0-9.]+) \|", out)
    assert row, out
    dice, ratio = float(row.group(1)), float(row.group(2))

    pkg = resolve_model("uvd-starter@4", [Registry(REPO / "Resources" / "Models")])
    model = LoadedModel.from_package(pkg)
    (case,) = ev.prepare_cases(select_cases(str(data), ["VB3_04"]), model.schema)
    pred = model.schema.values_to_channels(ev.predict([model], case.image))
    i, q, t = ev.level_range_counts(pred, case.truth, case.image, 1)
    assert dice == pytest.approx(2 * i / (q + t), abs=6e-4)
    assert ratio == pytest.approx(q / t, abs=6e-4)
    assert "| **all** | vertebral_body |" in out
