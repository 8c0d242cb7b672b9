"""DICOM SEG export: what a PACS receives references the source series, names its segments, and
stores exactly the label map (frames only where there is foreground, on the source geometry).

The source is a real sagittal MR series: the held-out sample case shipped in Resources/Sample, stored
PIR (one sagittal image per file), cropped to a few central slices and written with the project's own
DICOM series writer. Read back with highdicom and pydicom, never with the code under test.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from LumbarSegmentLib.cli.main import main
from LumbarSegmentLib.formats.dicom import write_dicom_series
from LumbarSegmentLib.formats.dicom_seg import DicomSegError, segment_numbers, write_dicom_seg
from LumbarSegmentLib.formats.io import read_volume, to_sitk
from LumbarSegmentLib.core.schema import LabelClass, LabelSchema, load_schema
from LumbarSegmentLib.core.volume import Volume

hd = pytest.importorskip("highdicom")
SAMPLE = Path(__file__).resolve().parents[1] / "Resources" / "Sample"


def sagittal_sample(name: str = "VB2_06_image.mha", slices: int = 4) -> Volume:
    """The sample case stored PIR (sagittal images), cropped to ``slices`` central sagittal slices."""
    import SimpleITK as sitk

    img = sitk.DICOMOrient(to_sitk(read_volume(SAMPLE / name)), "PIR")
    vol = Volume(sitk.GetArrayFromImage(img), spacing=img.GetSpacing(), origin=img.GetOrigin(),
                 direction=np.reshape(img.GetDirection(), (3, 3)))
    k0 = vol.array.shape[0] // 2 - slices // 2
    origin = np.asarray(vol.origin) + vol.direction[:, 2] * vol.spacing[2] * k0  # same physical slices
    return Volume(vol.array[k0:k0 + slices].astype(np.int16), spacing=vol.spacing, origin=origin,
                  direction=vol.direction)


def write_sample_series(folder: Path, slices: int = 4) -> list[Path]:
    return write_dicom_series(sagittal_sample(slices=slices), folder, description="VB2_06 T2 sag (sample)")


@pytest.fixture()
def series(tmp_path):
    files = write_sample_series(tmp_path / "dicom")
    return tmp_path / "dicom", files


def _uids(files):
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in files]


def check_seg_matches(seg_path: Path, source_folder: Path, labels: np.ndarray, schema: LabelSchema) -> None:
    """The SEG file at ``seg_path`` stores ``labels`` (on the series in ``source_folder``) faithfully."""
    src = read_volume(source_folder)  # ordered along the slice normal, like the label map
    sources = _uids(src.metadata["dicom"]["files"])
    seg = hd.seg.segread(seg_path)
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    # same patient, study and frame of reference; the series and every instance referenced
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.PatientID == sources[0].PatientID and seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    ref = seg.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in ref.ReferencedInstanceSequence} == \
        {d.SOPInstanceUID for d in sources}
    # one segment per foreground class, with the schema's name and SNOMED CT codes
    fg = schema.foreground
    assert len(seg.SegmentSequence) == len(fg)
    for item, cls in zip(seg.SegmentSequence, fg):
        assert item.SegmentLabel == cls.name
        cat, typ = item.SegmentedPropertyCategoryCodeSequence[0], item.SegmentedPropertyTypeCodeSequence[0]
        assert (cat.CodingSchemeDesignator, cat.CodeValue, cat.CodeMeaning) == tuple(cls.category)
        assert (typ.CodingSchemeDesignator, typ.CodeValue, typ.CodeMeaning) == tuple(cls.type)
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert np.allclose(hd.color.CIELabColor.from_dicom_value(item.RecommendedDisplayCIELabValue).to_rgb(),
                           cls.color, atol=2)  # Slicer shows it in the class colour
    # frames only where a segment has foreground on a slice
    numbers = segment_numbers(labels, schema)
    expected_frames = sum(int((numbers[k] == s).any()) for k in range(numbers.shape[0]) for s in range(1, len(fg) + 1))
    assert expected_frames > 0 and int(seg.NumberOfFrames) == expected_frames
    # every stored frame sits on its source slice's plane (position and orientation)
    ipp_of = {d.SOPInstanceUID: [float(x) for x in d.ImagePositionPatient] for d in sources}
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert np.allclose([float(x) for x in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
                       [float(x) for x in sources[0].ImageOrientationPatient], atol=1e-5)
    assert np.allclose([float(x) for x in shared.PixelMeasuresSequence[0].PixelSpacing],
                       [float(x) for x in sources[0].PixelSpacing])
    for frame in seg.PerFrameFunctionalGroupsSequence:
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        pos = [float(x) for x in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(pos, ipp_of[uid], atol=1e-4)
    # and the pixels, slice by slice, are the label map
    back = seg.get_pixels_by_source_instance([d.SOPInstanceUID for d in sources], combine_segments=True)
    assert back.shape == labels.shape
    assert np.array_equal(back, numbers)


def test_seg_of_a_real_label_map_round_trips(series, tmp_path):
    folder, _ = series
    src = read_volume(folder)
    import SimpleITK as sitk

    # the sample's reference annotation, cropped like the image: values 1 and 2 kept as the starter classes
    img = sitk.DICOMOrient(to_sitk(read_volume(SAMPLE / "VB2_06_label.mha")), "PIR")
    full = sitk.GetArrayFromImage(img)
    k0 = full.shape[0] // 2 - 2
    ref = full[k0:k0 + 4]
    labels = np.where(np.isin(ref, (1, 2)), ref, 0).astype(np.uint8)
    assert set(np.unique(labels)) == {0, 1, 2}
    labels[1][labels[1] == 2] = 0  # a slice without discs: its disc frame must be left out
    schema = load_schema("starter")
    write_dicom_seg(src.with_array(labels), src, schema, tmp_path / "seg.dcm", model_name="test", model_version="1")
    check_seg_matches(tmp_path / "seg.dcm", folder, labels, schema)
    assert int(hd.seg.segread(tmp_path / "seg.dcm").NumberOfFrames) == 7  # 4 slices x 2 classes - 1 empty


def test_cli_writes_label_map_and_seg_from_a_dicom_series(series, tmp_path, capsys):
    """The shipped default model on a real sagittal DICOM series: NIfTI and SEG agree voxel for voxel."""
    folder, _ = series
    out = tmp_path / "out"
    out.mkdir()
    rc = main(["segment", str(folder), "-o", str(out / "seg.nii.gz"), "--dicom-seg", str(out / "seg.dcm"),
               "--device", "cpu", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    labels = read_volume(out / "seg.nii.gz")
    src = read_volume(folder)
    assert labels.same_geometry(src)
    from LumbarSegmentLib.registry.packages import resolve_model

    check_seg_matches(out / "seg.dcm", folder, labels.array, resolve_model(None).schema)
    assert sorted(p.name for p in out.iterdir()) == ["seg.dcm", "seg.nii.gz"]


def test_non_dicom_input_is_refused_before_segmenting(tmp_path, tiny_package, capsys):
    src = tmp_path / "case.nii.gz"
    from LumbarSegmentLib.formats.io import write_volume

    write_volume(sagittal_sample(slices=2), src)
    out = tmp_path / "out"
    out.mkdir()
    rc = main(["segment", str(src), "-o", str(out / "seg.nii.gz"), "--dicom-seg", str(out / "seg.dcm"),
               "--model", str(tiny_package.path), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "--dicom-seg needs a DICOM series folder" in err
    assert list(out.iterdir()) == []


def test_uncoded_class_is_refused(series, tmp_path):
    folder, _ = series
    src = read_volume(folder)
    schema = LabelSchema("bare", (LabelClass(0, "background", "Background", (0, 0, 0)),
                                  LabelClass(1, "thing", "Thing", (255, 0, 0))))
    with pytest.raises(DicomSegError, match="'thing' has no category/type code"):
        write_dicom_seg(src.with_array(np.ones(src.array.shape, np.uint8)), src, schema, tmp_path / "x.dcm")


def test_label_map_off_the_source_grid_is_refused(series, tmp_path):
    folder, _ = series
    src = read_volume(folder)
    moved = Volume(np.zeros(src.array.shape, np.uint8), spacing=src.spacing,
                   origin=tuple(np.asarray(src.origin) + 5.0), direction=src.direction)
    with pytest.raises(DicomSegError, match="not on the source series' grid"):
        write_dicom_seg(moved, src, load_schema("starter"), tmp_path / "x.dcm")
