"""Post-processing (postprocess.spine_column): the spinal column stays, blobs apart from it go."""
from __future__ import annotations

import numpy as np
import pytest

from LumbarSegmentLib.inference.devices import EngineError
from LumbarSegmentLib.inference.engine import SegmentOptions
from LumbarSegmentLib.inference.postprocess import apply, spine_column


def _column(gap: int = 0):
    """[S, H, W]: bodies (1) and discs (2) alternating down the rows, ``gap`` empty rows between them."""
    lab = np.zeros((5, 160, 60), np.uint8)
    row = 5
    for k in range(8):
        h = 8 if k % 2 == 0 else 4
        lab[1:4, row:row + h, 20:35] = 1 if k % 2 == 0 else 2
        row += h + gap
    return lab


def test_a_blob_apart_from_the_column_is_removed_and_the_column_kept():
    lab = _column()
    blob = np.zeros_like(lab)
    blob[2:4, 40:48, 50:58] = 1  # a vertebra-like false positive in front of the spine
    out, info = spine_column(lab | blob, (1.0, 1.0, 1.0))
    assert np.array_equal(out, lab)
    assert info == {"pieces": 2, "kept": 1, "removed_voxels": int(blob.sum())}


def test_a_thin_gap_does_not_cut_the_column_but_a_wide_one_with_a_small_piece_does():
    lab = _column(gap=2)  # 2 mm gaps: bridged by the 3 mm dilation
    out, info = spine_column(lab, (1.0, 1.0, 1.0))
    assert np.array_equal(out, lab) and info["kept"] == 1 and info["pieces"] == 1
    far = _column(gap=8)  # 8 mm gaps (more than two 3 mm dilations): every body and disc is its own piece; all are big enough to keep
    out, info = spine_column(far, (1.0, 1.0, 1.0))
    assert np.array_equal(out, far) and info["pieces"] == 8 and info["removed_voxels"] == 0
    speck = far.copy()
    speck[2, 150, 5] = 2  # one voxel far away: below keep_fraction of the largest piece
    out, info = spine_column(speck, (1.0, 1.0, 1.0))
    assert np.array_equal(out, far) and info["removed_voxels"] == 1


def test_thick_slices_bridge_one_slice_and_nothing_is_painted():
    lab = np.zeros((6, 40, 40), np.uint8)
    lab[0:2, 5:30, 5:20] = 1
    lab[3:5, 5:30, 5:20] = 2  # one empty 4 mm slice between: bridged (radius ceil(3/4) = 1 slice)
    out, info = spine_column(lab, (4.0, 0.6, 0.6))
    assert np.array_equal(out, lab) and info["pieces"] == 1
    empty, info = spine_column(np.zeros_like(lab), (4.0, 0.6, 0.6))
    assert not empty.any() and info["pieces"] == 0


def test_unknown_mode_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown post-processing 'blobs'"):
        apply("blobs", _column(), (1, 1, 1))
    with pytest.raises(EngineError, match="unknown post-processing"):
        SegmentOptions(postprocess="blobs").validate()
    lab = _column()
    assert apply("none", lab, (1, 1, 1))[0] is lab


def test_engine_applies_it_and_reports_what_it_removed(tiny_package):
    from LumbarSegmentLib.inference.engine import segment_volume
    from LumbarSegmentLib.core.volume import Volume

    rng = np.random.default_rng(0)
    vol = Volume(rng.normal(100, 30, (6, 48, 48)).astype(np.float32), spacing=(1.0, 1.0, 1.0))
    plain = segment_volume(vol, [tiny_package], SegmentOptions(device="cpu", precision="fp32"))
    clean = segment_volume(vol, [tiny_package], SegmentOptions(device="cpu", precision="fp32", postprocess="spine"))
    pp = clean.report["postprocess"]
    assert pp["mode"] == "spine" and "postprocess" not in plain.report
    changed = plain.labels.array != clean.labels.array
    assert int(changed.sum()) == pp["removed_voxels"]
    assert not clean.labels.array[changed].any()  # it only ever sets voxels to background
    fg = {k: v for k, v in clean.report["voxels_per_class"].items() if k != "background"}
    assert sum(fg.values()) == int((clean.labels.array != 0).sum())
