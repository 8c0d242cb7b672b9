"""Per-level heights and volumes (``measurements.py``): synthetic outlines with known heights, a real
manual label, and the CLI's CSV/PNG outputs (leaving the default draft untouched)."""
from __future__ import annotations

import numpy as np
import pytest

from LumbarSegmentLib.spine.level_names import level_value
from LumbarSegmentLib.spine.measurements import COLUMNS, HEIGHTS, measure_levels, measure_slice, to_csv
from LumbarSegmentLib.core.volume import Volume


def _wedge(anterior_mm, posterior_mm, depth_mm, spacing, tilt_deg=0.0, size=(160, 160)):
    """A 2D outline [row, col]: a trapezoid with the given anterior/posterior heights, rotated by tilt."""
    sr, sc = spacing
    r = (np.arange(size[0]) + 0.5) * sr - size[0] * sr / 2
    c = (np.arange(size[1]) + 0.5) * sc - size[1] * sc / 2
    rr, cc = np.meshgrid(r, c, indexing="ij")
    th = np.radians(tilt_deg)
    h = rr * np.cos(th) + cc * np.sin(th)  # along the height axis
    d = -rr * np.sin(th) + cc * np.cos(th)  # along the depth axis (anterior = negative)
    frac = (d + depth_mm / 2) / depth_mm
    half = (anterior_mm + (posterior_mm - anterior_mm) * frac) / 2
    return (np.abs(d) <= depth_mm / 2) & (np.abs(h) <= half)


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (0.5, 0.7), (0.9, 0.45)])
def test_rectangle_heights_and_depth(spacing):
    res = measure_slice(_wedge(25.0, 25.0, 36.0, spacing), spacing)
    for key in HEIGHTS:
        assert res[key] == pytest.approx(25.0, abs=max(spacing) + 0.05)
    assert res["depth_mm"] == pytest.approx(36.0, abs=max(spacing) + 0.05)
    assert len(res["lines"]) == 3


def test_wedge_heights_at_ten_fifty_ninety_percent():
    res = measure_slice(_wedge(20.0, 28.0, 40.0, (0.5, 0.5)), (0.5, 0.5))
    assert res["anterior_height_mm"] == pytest.approx(20.8, abs=0.6)
    assert res["middle_height_mm"] == pytest.approx(24.0, abs=0.6)
    assert res["posterior_height_mm"] == pytest.approx(27.2, abs=0.6)


def test_tilted_body_measured_along_its_own_axes():
    res = measure_slice(_wedge(25.0, 25.0, 38.0, (0.5, 0.5), tilt_deg=20.0), (0.5, 0.5))
    for key in HEIGHTS:
        assert res[key] == pytest.approx(25.0, abs=1.0)  # not 25 / cos(20 deg) = 26.6
    assert res["depth_mm"] == pytest.approx(38.0, abs=1.0)


def test_jagged_border_does_not_decide_a_height():
    """A 24 mm x 30 mm body whose endplates are ragged (single pixel columns sticking out or cut in,
    as drafts and hand-drawn polygons have) and with a 1.5 mm wide lump on the upper endplate right
    over the anterior height line: every height stays the body's 24 mm."""
    sp = (0.5, 0.5)
    mask = np.zeros((120, 120), bool)
    mask[30:78, 30:90] = True  # rows 24 mm (cranio-caudal), columns 30 mm (anterior at the left)
    mask[27:30, 30:90:4] = True  # every fourth column 1.5 mm higher
    mask[75:78, 32:90:4] = False  # every fourth column 1.5 mm shorter
    mask[26:30, 35:38] = True  # a 1.5 mm lump, 2 mm high, at 10 % of the depth from the front
    res = measure_slice(mask, sp)
    for key in HEIGHTS:
        assert res[key] == pytest.approx(24.0, abs=0.6), (key, res[key])
    assert res["depth_mm"] == pytest.approx(30.0, abs=0.6)


def test_levels_rows_volume_and_csv():
    spacing = (3.0, 0.5, 0.5)  # x (slices), y, z
    arr = np.zeros((120, 120, 5), np.uint8)  # [k=z, j=y, i=x]; z runs up
    body = _wedge(25.0, 25.0, 36.0, (0.5, 0.5), size=(120, 120))[::-1]
    arr[..., 1:4][body] = level_value("L3")
    disc = np.zeros_like(body)
    disc[15:25, 30:90] = True
    arr[..., 2][disc & ~body] = level_value("L3-L4")
    rows = measure_levels(Volume(arr, spacing=spacing))
    assert [r["level"] for r in rows] == ["L3", "L3-L4"]
    l3 = rows[0]
    assert l3["volume_mm3"] == pytest.approx(body.sum() * 3 * 0.5 * 0.5 * 3, rel=1e-6)
    assert l3["middle_height_mm"] == pytest.approx(25.0, abs=0.6) and l3["slice"] == 2
    assert rows[1]["middle_height_mm"] == pytest.approx(5.0, abs=0.6)
    text = to_csv(rows).splitlines()
    assert text[0] == ",".join(COLUMNS) and text[1].startswith("L3,vertebral_body,22,")


def test_real_manual_label_measures_plausible_heights(shared_data):
    from LumbarSegmentLib.formats.io import read_volume

    path = shared_data / "lumbar-mr" / "VB3_10_label.mha"  # values 1..5 = L1..L5, 1 at the top
    lab = read_volume(path)
    arr = np.asarray(lab.array)
    levels = np.zeros(arr.shape, np.uint8)
    for v, name in zip(range(1, 6), ("L1", "L2", "L3", "L4", "L5")):
        levels[arr == v] = level_value(name)
    rows = measure_levels(lab.with_array(levels))
    assert [r["level"] for r in rows] == ["L1", "L2", "L3", "L4", "L5"]
    for r in rows:
        for key in HEIGHTS:
            assert 18.0 < r[key] < 40.0, (r["level"], key, r[key])
        assert 22.0 < r["depth_mm"] < 60.0


def test_cli_measurements_png_and_default_draft_unchanged(shared_data, tmp_path):
    image = shared_data / "t1-levels" / "T1L_0101_image.mha"
    if not image.exists():
        pytest.skip("t1-levels/ is not in the shared data")
    from LumbarSegmentLib.cli.main import main
    from LumbarSegmentLib.formats.io import read_volume

    plain, named = tmp_path / "plain.nii.gz", tmp_path / "named.nii.gz"
    assert main(["segment", str(image), "-o", str(plain), "--no-progress"]) == 0
    csv, png = tmp_path / "m.csv", tmp_path / "m.png"
    assert main(["segment", str(image), "-o", str(named), "--measurements", str(csv), "--measurements-png",
                 str(png), "--no-progress"]) == 0
    # --measurements without --levels: the label map keeps the model's classes, bit for bit
    assert np.array_equal(np.asarray(read_volume(plain).array), np.asarray(read_volume(named).array))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = csv.read_text().splitlines()
    assert len(rows) > 5 and any(r.startswith("L3,vertebral_body") for r in rows)
    bad = tmp_path / "m.txt"
    assert main(["segment", str(image), "-o", str(tmp_path / "x.nii.gz"), "--measurements", str(bad),
                 "--no-progress"]) == 1
    assert not (tmp_path / "x.nii.gz").exists() and not bad.exists()
