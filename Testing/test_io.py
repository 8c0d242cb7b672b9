"""Tests for LumbarSegmentLib.formats.io: lossless round trips of real volumes, helpful read errors,
and atomic writes that never leave a partial file behind.

Run with:  cd <repo> && python -m pytest Testing/test_io.py -q
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LumbarSegmentLib.formats import io as lio
from LumbarSegmentLib.formats.io import VolumeReadError, read_volume, write_volume
from LumbarSegmentLib.core.volume import Volume, VolumeError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _one_image_per_source() -> list[str]:
    """The first image of each source (IVD, VB1, VB2, VB3): the data set grew to 73 cases whose
    sources share one format, so a round trip of each source covers what all of them would."""
    first: dict[str, str] = {}
    for p in sorted((DATA / "lumbar-mr").glob("*_image.mha")):
        first.setdefault(p.name.split("_")[0], f"lumbar-mr/{p.name}")
    return list(first.values())


REAL = sorted(_one_image_per_source()
              + [f"spider-masks/{p.name}" for p in (DATA / "spider-masks").glob("*.mha")]) or ["(no data)"]
FORMATS = [".nii.gz", ".nrrd", ".mha"]
TOL = 1e-5


def assert_same_volume(a: Volume, b: Volume, tol: float = TOL) -> None:
    assert a.array.dtype == b.array.dtype
    assert a.shape == b.shape
    assert np.array_equal(a.array, b.array)
    np.testing.assert_allclose(a.spacing, b.spacing, rtol=tol, atol=tol)
    # NIfTI keeps its affine in float32, so an origin of -2413.4 mm comes back to ~1e-4 mm:
    # a relative tolerance is the honest comparison for positions
    np.testing.assert_allclose(a.origin, b.origin, rtol=tol, atol=tol)
    np.testing.assert_allclose(a.direction, b.direction, atol=tol)


# ----------------------------------------------------------------------------------------
# round trips of every real image and mask
@pytest.mark.parametrize("name", REAL)
def test_real_volume_round_trips_through_every_format(shared_data, tmp_path, name):
    src = read_volume(shared_data / name)
    assert src.metadata["source"].endswith(Path(name).name)
    for suffix in FORMATS:
        out = write_volume(src, tmp_path / f"copy{suffix}")
        assert out.exists()
        back = read_volume(out)
        assert_same_volume(src, back)
    # only the three outputs, no temporary files left over
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"copy{s}" for s in FORMATS)


def test_bool_mask_is_written_as_uint8(tmp_path):
    vol = Volume(np.eye(4, dtype=bool)[None].repeat(3, 0), spacing=(0.5, 0.5, 3.0))
    back = read_volume(write_volume(vol, tmp_path / "mask.nrrd"))
    assert back.array.dtype == np.uint8 and np.array_equal(back.array, vol.array)


def test_write_refuses_multi_file_and_unknown_suffixes(tmp_path):
    vol = Volume(np.zeros((2, 3, 4), np.int16))
    for name in ("x.mhd", "x.nhdr", "x.png", "x"):
        with pytest.raises(VolumeError, match="single-file output"):
            write_volume(vol, tmp_path / name)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------
# read errors are VolumeReadError with a message a user can act on
def _first_half(path: Path, dest: Path) -> Path:
    data = path.read_bytes()
    dest.write_bytes(data[: len(data) // 2])
    return dest


def test_empty_file(tmp_path):
    p = tmp_path / "empty.nii.gz"
    p.write_bytes(b"")
    with pytest.raises(VolumeReadError, match="empty"):
        read_volume(p)


@pytest.mark.parametrize("suffix", [".mha", ".nii.gz", ".nrrd"])
def test_truncated_file(shared_data, tmp_path, suffix):
    src = read_volume(shared_data / "lumbar-mr" / "VB3_01_image.mha")
    full = write_volume(src, tmp_path / f"full{suffix}")
    cut = _first_half(full, tmp_path / f"cut{suffix}")
    with pytest.raises(VolumeReadError) as info:
        read_volume(cut)
    msg = str(info.value)
    assert "cut" in msg and "cannot read" in msg and "truncated" in msg


def test_truncated_original_mha(shared_data, tmp_path):
    cut = _first_half(shared_data / "spider-masks" / "166_t2.mha", tmp_path / "166_t2.mha")
    with pytest.raises(VolumeReadError, match="truncated"):
        read_volume(cut)


def test_truncated_uncompressed_nifti(tmp_path):
    vol = Volume(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6))
    full = write_volume(vol, tmp_path / "full.nii", compress=False)
    cut = _first_half(full, tmp_path / "cut.nii")
    with pytest.raises(VolumeReadError, match="truncated"):
        read_volume(cut)


def test_gzip_with_truncated_payload(tmp_path):
    vol = Volume(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6))
    raw = write_volume(vol, tmp_path / "full.nii", compress=False).read_bytes()
    p = tmp_path / "cut.nii.gz"
    p.write_bytes(gzip.compress(raw[: len(raw) - 20]))  # a valid gzip stream, but too few voxels
    with pytest.raises(VolumeReadError, match="cannot read"):
        read_volume(p)


def test_garbage_with_nrrd_suffix(tmp_path):
    p = tmp_path / "garbage.nrrd"
    p.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(VolumeReadError) as info:
        read_volume(p)
    assert "garbage.nrrd" in str(info.value) and "cannot read" in str(info.value)


def test_unknown_suffix(tmp_path):
    p = tmp_path / "scan.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(VolumeReadError) as info:
        read_volume(p)
    msg = str(info.value)
    assert "unsupported file type" in msg and ".nii.gz" in msg and "DICOM" in msg


def test_missing_path(tmp_path):
    with pytest.raises(VolumeReadError, match="no such file"):
        read_volume(tmp_path / "nowhere.nii.gz")


def test_2d_image(tmp_path):
    p = tmp_path / "slice.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((20, 30), np.int16)), str(p))
    with pytest.raises(VolumeReadError) as info:
        read_volume(p)
    msg = str(info.value)
    assert "2D" in msg and "3D" in msg


def test_4d_image(tmp_path):
    p = tmp_path / "dynamic.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5, 6), np.int16), isVector=False), str(p))
    with pytest.raises(VolumeReadError) as info:
        read_volume(p)
    msg = str(info.value)
    assert "4D" in msg and "3D" in msg


def test_vector_rgb_image(tmp_path):
    p = tmp_path / "rgb.mha"
    rgb = sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.uint8), isVector=True)
    assert rgb.GetNumberOfComponentsPerPixel() == 3
    sitk.WriteImage(rgb, str(p))
    with pytest.raises(VolumeReadError) as info:
        read_volume(p)
    msg = str(info.value)
    assert "3 components" in msg and "single-channel" in msg


def test_non_orthonormal_direction_is_a_read_error(tmp_path):
    p = tmp_path / "sheared.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5), np.int16)), str(p))
    text = p.read_bytes()
    assert b"TransformMatrix = 1 0 0 0 1 0 0 0 1" in text
    p.write_bytes(text.replace(b"TransformMatrix = 1 0 0 0 1 0 0 0 1", b"TransformMatrix = 1 0 0 0.5 1 0 0 0 1"))
    with pytest.raises(VolumeReadError) as info:
        read_volume(p)
    assert "sheared.mha" in str(info.value) and "orthonormal" in str(info.value)


# ----------------------------------------------------------------------------------------
# writes are atomic
def _small():
    return Volume(np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4), spacing=(0.5, 0.6, 3.0))


def test_write_into_missing_folder_raises(tmp_path):
    with pytest.raises(OSError, match="does not exist"):
        write_volume(_small(), tmp_path / "no" / "such" / "out.nii.gz")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="running as root: file permissions do not stop root from writing")
def test_write_into_read_only_folder_raises_and_leaves_nothing(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(OSError, match="not writable"):
            write_volume(_small(), folder / "out.nii.gz")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


def test_write_when_the_os_refuses_the_temp_file(tmp_path, monkeypatch):
    """What a non-root user sees in a read-only folder, simulated so it also runs as root."""
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(kwargs.get("dir", "")))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(PermissionError):
        write_volume(_small(), tmp_path / "out.nii.gz")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", FORMATS)
@pytest.mark.parametrize("failure", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch, suffix, failure):
    target = tmp_path / f"label{suffix}"
    # an older, complete result at the target must survive the failed overwrite untouched
    write_volume(_small(), target)
    before = target.read_bytes()
    seen = []

    def half_write(image, path, *args, **kwargs):
        Path(path).write_bytes(b"partial data")  # the writer got part-way through
        seen.append(Path(path))
        raise failure

    monkeypatch.setattr(sitk, "WriteImage", half_write)
    expected = OSError if isinstance(failure, RuntimeError) else KeyboardInterrupt
    with pytest.raises(expected) as info:
        write_volume(Volume(np.ones((2, 3, 4), np.int16)), target)
    if expected is OSError:
        assert "could not write" in str(info.value) and "disk full" in str(info.value)
    assert seen and seen[0].parent == tmp_path and seen[0] != target  # it wrote to a temporary name
    assert not seen[0].exists()
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
    assert target.read_bytes() == before


def test_atomic_path_renames_only_on_success(tmp_path):
    target = tmp_path / "result.nrrd"
    with lio.atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".nrrd")
        tmp.write_bytes(b"done")
        assert not target.exists()
    assert target.read_bytes() == b"done"
    assert [p.name for p in tmp_path.iterdir()] == ["result.nrrd"]
