"""Tests for LumbarSegmentLib.formats.dicom: DICOM series folders -> Volume, and the refusals.

Series are built in tmp_path with ``write_dicom_series`` (from real volumes where the
shared data exists, otherwise from small synthetic ones), then read back through
``read_volume(folder)`` exactly as the CLI and the Slicer module do.

Run with:  cd <repo> && python -m pytest Testing/test_dicom.py -q
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from LumbarSegmentLib.formats.dicom import DicomError, read_dicom_series, write_dicom_series
from LumbarSegmentLib.core.geometry import axis_codes, sagittal_layout
from LumbarSegmentLib.formats.io import VolumeReadError, read_volume, to_sitk
from LumbarSegmentLib.core.volume import Volume, VolumeError

TOL = 1e-4


def assert_same(a: Volume, b: Volume) -> None:
    assert a.shape == b.shape
    assert np.array_equal(a.array, b.array)
    np.testing.assert_allclose(a.spacing, b.spacing, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(a.origin, b.origin, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(a.direction, b.direction, atol=TOL)
    assert a.same_geometry(b, tol=TOL)


def synthetic(shape=(9, 14, 11), seed=0) -> Volume:
    """A small oblique sagittal stack stored slice-axis-last (PIR-like, 3.3 mm slices along k)."""
    rng = np.random.default_rng(seed)
    t = np.radians(4.0)
    row = np.array([0.0, np.cos(t), np.sin(t)])  # ~P
    col = np.array([0.0, np.sin(t), -np.cos(t)])  # ~I
    direction = np.column_stack([row, col, np.cross(row, col)])  # ~R
    assert axis_codes(direction) == "PIR"
    return Volume(rng.integers(-50, 3000, size=shape).astype(np.int16), spacing=(0.5859375, 0.5859375, 3.3),
                  origin=(20.15, -155.45, 233.82), direction=direction)


def files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix == ".dcm")


def edit(path: Path, **changes) -> None:
    ds = pydicom.dcmread(path)
    for key, value in changes.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture
def series(tmp_path):
    vol = synthetic()
    folder = tmp_path / "series"
    write_dicom_series(vol, folder, description="synthetic T2 sag")
    return vol, folder


# ----------------------------------------------------------------------------------------
# real volumes -> DICOM -> the same volume
def _real_cases(shared_data: Path, case: str) -> Volume:
    if case == "VB3_01":
        vol = read_volume(shared_data / "lumbar-mr" / "VB3_01_image.mha")  # LPS: files are axial planes
    elif case == "VB3_01_sagittal_files":  # the same volume stored PIR: one sagittal image per file
        img = sitk.DICOMOrient(to_sitk(read_volume(shared_data / "lumbar-mr" / "VB3_01_image.mha")), "PIR")
        vol = Volume(sitk.GetArrayFromImage(img), spacing=img.GetSpacing(), origin=img.GetOrigin(),
                     direction=np.reshape(img.GetDirection(), (3, 3)))
    else:
        vol = read_volume(shared_data / "spider-masks" / f"{case}.mha")
    return vol.with_array(vol.array.astype(np.int16))


@pytest.mark.parametrize("case", ["VB3_01", "VB3_01_sagittal_files", "166_t2", "185_t2"])
def test_real_volume_survives_a_dicom_round_trip(shared_data, tmp_path, case):
    src = _real_cases(shared_data, case)
    if case in ("166_t2", "185_t2"):
        assert axis_codes(src.direction) == "PIR"
        assert not np.allclose(np.abs(src.direction), np.round(np.abs(src.direction)))  # oblique
    paths = write_dicom_series(src, tmp_path / "dicom", description=f"{case} test")
    assert len(paths) == src.shape[0]
    back = read_volume(tmp_path / "dicom")
    assert back.array.dtype == np.int16
    assert_same(src, back)
    assert back.metadata["dicom"]["images"] == src.shape[0]
    assert back.metadata["dicom"]["series_description"] == f"{case} test"
    # so it segments identically: same canonical stack, same layout
    la, lb = sagittal_layout(src), sagittal_layout(back)
    assert (la.perm, la.flip, la.resliced) == (lb.perm, lb.flip, lb.resliced)
    np.testing.assert_allclose(la.spacing_src, lb.spacing_src, rtol=TOL)
    assert np.array_equal(la.to_canonical(src.array), lb.to_canonical(back.array))
    # and an independent reader (GDCM via SimpleITK) sees the same image
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "dicom")))
    ref = reader.Execute()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ref), back.array)
    np.testing.assert_allclose(ref.GetOrigin(), back.origin, atol=1e-3)
    np.testing.assert_allclose(np.reshape(ref.GetDirection(), (3, 3)), back.direction, atol=1e-5)
    np.testing.assert_allclose(ref.GetSpacing(), back.spacing, rtol=1e-4)


def test_synthetic_round_trip_and_written_header(series):
    vol, folder = series
    back = read_volume(folder)
    assert_same(vol, back)
    ds = pydicom.dcmread(files(folder)[0])
    assert ds.Modality == "MR" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4"
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert float(ds.SliceThickness) == pytest.approx(3.3)
    assert [float(v) for v in ds.PixelSpacing] == pytest.approx([0.5859375, 0.5859375])
    uids = {(d.StudyInstanceUID, d.SeriesInstanceUID) for d in map(pydicom.dcmread, files(folder))}
    assert len(uids) == 1
    assert len({pydicom.dcmread(p).SOPInstanceUID for p in files(folder)}) == len(files(folder))


def test_left_handed_volume_comes_back_in_slice_normal_order(tmp_path):
    vol = Volume(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6), spacing=(0.7, 0.8, 4.0),
                 origin=(1.0, 2.0, 3.0), direction=np.diag([1.0, 1.0, -1.0]))  # L, P, I: det -1
    write_dicom_series(vol, tmp_path / "lh")
    back = read_volume(tmp_path / "lh")
    assert np.array_equal(back.array, vol.array[::-1])
    np.testing.assert_allclose(back.direction, np.eye(3), atol=1e-9)
    np.testing.assert_allclose(back.origin, (1.0, 2.0, 3.0 - 3 * 4.0))  # the most inferior slice


def test_orientation_written_with_few_digits_is_accepted(series):
    vol, folder = series
    for p in files(folder):
        ds = pydicom.dcmread(p)
        edit(p, ImageOrientationPatient=[f"{float(v):.2f}" for v in ds.ImageOrientationPatient])
    back = read_volume(folder)
    assert np.array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.direction.T @ back.direction, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(back.direction, vol.direction, atol=2e-3)


def test_shuffled_file_names_still_sort_by_position(series):
    vol, folder = series
    paths = files(folder)
    names = [p.name for p in paths]
    random.Random(4).shuffle(names)
    for p in paths:
        p.rename(p.with_suffix(".tmp"))
    for p, new in zip(paths, names):
        p.with_suffix(".tmp").rename(folder / new)
    # make InstanceNumber useless too: position must be the only sort key
    for p in files(folder):
        edit(p, InstanceNumber=1)
    assert_same(vol, read_volume(folder))


def test_nested_folders_are_searched(series, tmp_path):
    vol, folder = series
    nested = tmp_path / "export" / "PA0" / "ST0"
    nested.mkdir(parents=True)
    shutil.move(str(folder), nested / "SE0")
    assert_same(vol, read_volume(tmp_path / "export"))


# ----------------------------------------------------------------------------------------
# choosing a series
def test_two_series_are_listed_then_one_is_picked(tmp_path):
    a, b = synthetic(seed=1), synthetic(shape=(6, 10, 12), seed=2)
    folder = tmp_path / "study"
    write_dicom_series(a, folder, series_uid="1.2.826.0.1.3680043.8.498.1", description="T2 SAG", prefix="A")
    write_dicom_series(b, folder, series_uid="1.2.826.0.1.3680043.8.498.2", description="T1 SAG",
                       series_number=2, prefix="B")
    with pytest.raises(DicomError) as info:
        read_volume(folder)
    msg = str(info.value)
    for text in ("2 DICOM series", "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2", "T2 SAG",
                 "T1 SAG", "9 image(s)", "6 image(s)", "sagittal", "series_uid", "--series"):
        assert text in msg, (text, msg)
    assert isinstance(info.value, VolumeReadError)
    assert_same(b, read_volume(folder, series_uid="1.2.826.0.1.3680043.8.498.2"))
    assert_same(a, read_dicom_series(folder, series_uid="1.2.826.0.1.3680043.8.498.1"))
    with pytest.raises(DicomError, match="no series with SeriesInstanceUID 9.9.9") as info:
        read_volume(folder, series_uid="9.9.9")
    assert "T1 SAG" in str(info.value)


def test_axial_series_is_named_axial_in_the_listing(tmp_path):
    folder = tmp_path / "two"
    write_dicom_series(synthetic(), folder, description="sag", prefix="S")
    write_dicom_series(Volume(np.zeros((3, 4, 5), np.int16), spacing=(0.5, 0.5, 5.0)), folder,
                       description="ax", prefix="X")
    with pytest.raises(DicomError) as info:
        read_volume(folder)
    lines = str(info.value).splitlines()
    assert any("'ax'" in ln and "axial (LPS)" in ln for ln in lines)
    assert any("'sag'" in ln and "sagittal (PIR)" in ln for ln in lines)


# ----------------------------------------------------------------------------------------
# refusing broken stacks
def test_missing_middle_slice_is_a_gap(series):
    vol, folder = series
    paths = files(folder)
    paths[4].unlink()
    with pytest.raises(DicomError) as info:
        read_volume(folder)
    msg = str(info.value)
    assert "gap" in msg and "1 missing slice" in msg
    assert paths[3].name in msg and paths[5].name in msg
    assert "6.600 mm" in msg and "3.300 mm" in msg


def test_two_missing_slices(series):
    _, folder = series
    paths = files(folder)
    paths[2].unlink()
    paths[3].unlink()
    with pytest.raises(DicomError, match="about 2 missing slice"):
        read_volume(folder)


def test_uneven_spacing_is_refused(series):
    _, folder = series
    ds = pydicom.dcmread(files(folder)[3])
    normal = np.cross(np.array(ds.ImageOrientationPatient[:3], float), np.array(ds.ImageOrientationPatient[3:], float))
    shifted = np.array(ds.ImagePositionPatient, float) + 1.0 * normal  # 1 mm off a 3.3 mm grid
    edit(files(folder)[3], ImagePositionPatient=[f"{v:.6f}" for v in shifted])
    with pytest.raises(DicomError, match="irregular slice spacing") as info:
        read_volume(folder)
    assert files(folder)[3].name in str(info.value)


def test_duplicate_slice_is_refused(series):
    _, folder = series
    paths = files(folder)
    copy = folder / "copy_of_slice.dcm"
    shutil.copy(paths[2], copy)
    with pytest.raises(DicomError) as info:
        read_volume(folder)
    msg = str(info.value)
    assert "duplicate slice position" in msg
    assert paths[2].name in msg and copy.name in msg


def test_inconsistent_orientation_is_refused(series):
    _, folder = series
    target = files(folder)[5]
    edit(target, ImageOrientationPatient=["1", "0", "0", "0", "1", "0"])
    with pytest.raises(DicomError, match="inconsistent orientation") as info:
        read_volume(folder)
    assert target.name in str(info.value)


def test_inconsistent_pixel_spacing_is_refused(series):
    _, folder = series
    target = files(folder)[1]
    edit(target, PixelSpacing=["0.6", "0.6"])
    with pytest.raises(DicomError, match="inconsistent pixel spacing") as info:
        read_volume(folder)
    assert target.name in str(info.value)


def test_inconsistent_image_size_is_refused(tmp_path):
    folder = tmp_path / "mixed"
    vol = synthetic()
    write_dicom_series(vol, folder)
    small = Volume(vol.array[:, :10, :8], spacing=vol.spacing, origin=vol.origin, direction=vol.direction)
    write_dicom_series(small, tmp_path / "small")
    # swap one slice for the same slice with a smaller matrix, same series
    uid = pydicom.dcmread(files(folder)[0]).SeriesInstanceUID
    replacement = files(tmp_path / "small")[3]
    edit(replacement, SeriesInstanceUID=uid)
    shutil.copy(replacement, files(folder)[3])
    with pytest.raises(DicomError, match="inconsistent image size") as info:
        read_volume(folder)
    assert files(folder)[3].name in str(info.value) and "10x8" in str(info.value)


def test_sheared_stack_is_refused(series):
    _, folder = series
    for n, p in enumerate(files(folder)):
        ds = pydicom.dcmread(p)
        row = np.array(ds.ImageOrientationPatient[:3], float)
        pos = np.array(ds.ImagePositionPatient, float) + n * 0.5 * row  # slides along the rows
        edit(p, ImagePositionPatient=[f"{v:.6f}" for v in pos])
    with pytest.raises(DicomError, match="not stacked along their normal"):
        read_volume(folder)


def test_multi_frame_object_is_refused_clearly(series):
    _, folder = series
    for p in files(folder):
        edit(p, NumberOfFrames=2)
    with pytest.raises(DicomError, match="multi-frame"):
        read_volume(folder)


# ----------------------------------------------------------------------------------------
# pixel data
def test_rescale_slope_and_intercept_are_applied(series):
    vol, folder = series
    for p in files(folder):
        edit(p, RescaleSlope="2", RescaleIntercept="-100")
    back = read_volume(folder)
    assert np.array_equal(back.array, vol.array.astype(np.int64) * 2 - 100)
    assert np.issubdtype(back.array.dtype, np.integer)
    for p in files(folder):
        edit(p, RescaleSlope="0.5", RescaleIntercept="1.25")
    back = read_volume(folder)
    assert back.array.dtype == np.float32
    np.testing.assert_allclose(back.array, vol.array * 0.5 + 1.25, rtol=1e-6)


def test_decodable_compressed_series_is_read(series):
    vol, folder = series
    for p in files(folder):
        ds = pydicom.dcmread(p)
        ds.compress(pydicom.uid.RLELossless)
        ds.save_as(p, enforce_file_format=True)
    assert pydicom.dcmread(files(folder)[0]).file_meta.TransferSyntaxUID.is_compressed
    assert_same(vol, read_volume(folder))


def test_undecodable_compressed_series_gives_a_clear_message(series):
    _, folder = series
    target = files(folder)[0]
    ds = pydicom.dcmread(target)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEG2000Lossless
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 60])  # not a real J2K stream
    ds["PixelData"].VR = "OB"
    ds.save_as(target, enforce_file_format=True)
    with pytest.raises(DicomError) as info:
        read_volume(folder)
    msg = str(info.value)
    assert target.name in msg and "compressed" in msg and "JPEG 2000" in msg and "decompress" in msg


# ----------------------------------------------------------------------------------------
# what is not an image is ignored; nothing at all is an error
def test_non_image_files_are_ignored_and_counted(series):
    vol, folder = series
    (folder / "README.txt").write_text("exported by the PACS\n")
    (folder / "meta.json").write_text('{"patient": "anonymous"}')
    (folder / "DICOMDIR").write_bytes(b"\x00" * 128 + b"DICM" + b"junk that is not a directory record")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    # a real (if minimal) DICOMDIR under another name, and a DICOM object with no image geometry
    dicomdir = pydicom.Dataset()
    dicomdir.file_meta = pydicom.dataset.FileMetaDataset()
    dicomdir.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    dicomdir.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    dicomdir.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    dicomdir.DirectoryRecordSequence = []
    dicomdir.save_as(folder / "INDEX", enforce_file_format=True)
    report = pydicom.Dataset()
    report.file_meta = pydicom.dataset.FileMetaDataset()
    report.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # basic text SR
    report.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    report.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    report.SOPClassUID = report.file_meta.MediaStorageSOPClassUID
    report.SeriesInstanceUID = pydicom.uid.generate_uid()
    report.Modality = "SR"
    report.save_as(folder / "report.dcm", enforce_file_format=True)

    back = read_volume(folder)
    assert_same(vol, back)
    assert back.metadata["dicom"]["skipped"] == {"not_dicom": 3, "dicomdir": 2, "unreadable": 0,
                                                 "without_image_geometry": 1}


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DicomError, match="no DICOM image series found") as info:
        read_volume(tmp_path / "empty")
    assert "no files" in str(info.value)


def test_folder_of_junk_says_what_was_skipped(tmp_path):
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "a.txt").write_text("hello")
    (folder / "b.json").write_text("{}")
    (folder / "DICOMDIR").write_bytes(b"nope")
    with pytest.raises(DicomError) as info:
        read_volume(folder)
    msg = str(info.value)
    assert "no DICOM image series found" in msg and "2 not dicom" in msg and "1 dicomdir" in msg


def test_single_slice_series_uses_the_slice_thickness(tmp_path):
    vol = Volume(np.arange(20, dtype=np.int16).reshape(1, 4, 5), spacing=(0.5, 0.6, 4.4))
    write_dicom_series(vol, tmp_path / "one")
    back = read_volume(tmp_path / "one")
    assert_same(vol, back)


def test_writer_refuses_values_that_do_not_fit(tmp_path):
    with pytest.raises(VolumeError, match="16 bits"):
        write_dicom_series(Volume(np.full((2, 2, 2), 70000, np.int32)), tmp_path / "x")
    with pytest.raises(VolumeError, match="integers"):
        write_dicom_series(Volume(np.full((2, 2, 2), 0.5, np.float32)), tmp_path / "y")
    big = Volume(np.full((2, 2, 2), 60000, np.int32))
    write_dicom_series(big, tmp_path / "z")
    assert read_volume(tmp_path / "z").array.dtype == np.uint16
