"""Volume -> a plain uncompressed DICOM MR series (one file per ``k`` slice).

The tests and demos use it to turn real volumes into DICOM folders; reading them back with
:func:`LumbarSegmentLib.formats.dicom.read_dicom_series` gives the same array and geometry.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from LumbarSegmentLib.core.volume import Volume, VolumeError

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def write_dicom_series(volume: Volume, folder: str | os.PathLike, series_uid: str | None = None,
                       description: str = "LumbarSegment series", *, study_uid: str | None = None,
                       series_number: int = 1, prefix: str = "IM") -> list[Path]:
    """Write ``volume`` as an uncompressed MR series, one file per ``k`` slice, into ``folder``.

    Voxels must be integers that fit in int16 or uint16 (bool/uint8/int8 are widened).
    Each file carries ImagePositionPatient, ImageOrientationPatient (the ``i`` and
    ``j`` directions), PixelSpacing, SliceThickness and fresh SOP/Study/Series UIDs.
    Reading the folder back gives the same array and geometry, provided the
    direction matrix is right-handed (``k`` along ``i x j``); a left-handed volume
    comes back with its ``k`` axis reversed (same physical image, other storage order).
    Returns the written paths.
    """
    import pydicom
    from pydicom.uid import generate_uid

    pixels = _integer_pixels(volume.array)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series = {"StudyInstanceUID": study_uid or generate_uid(), "SeriesInstanceUID": series_uid or generate_uid(),
              "FrameOfReferenceUID": generate_uid(), "SeriesNumber": int(series_number),
              "SeriesDescription": description[:64]}
    n = pixels.shape[0]
    width = max(4, len(str(n)))
    paths = []
    for k in range(n):
        path = folder / f"{prefix}{k + 1:0{width}d}.dcm"
        ds = _new_file(path)
        for key, value in series.items():
            setattr(ds, key, value)
        _fill_mr_header(ds, k + 1)
        _fill_geometry(ds, volume, k)
        _fill_pixels(ds, pixels[k])
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def _new_file(path: Path):
    """An empty MR image file dataset with its file meta and a fresh SOP instance UID."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
    sop_uid = generate_uid()
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = MR_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    return ds


def _fill_mr_header(ds, instance: int) -> None:
    """The patient, study and MR acquisition attributes an MR image must carry (anonymous, blank)."""
    ds.Modality = "MR"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.PatientName = "Anonymous^LumbarSegment"
    ds.PatientID = "LUMBARSEGMENT"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyDate = ""
    ds.StudyTime = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.Manufacturer = "LumbarSegment"
    ds.InstanceNumber = instance
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = "NONE"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.EchoTime = ""
    ds.RepetitionTime = ""
    ds.EchoTrainLength = ""
    ds.PositionReferenceIndicator = ""


def _fill_geometry(ds, volume: Volume, k: int) -> None:
    """Position, orientation and spacing of slice ``k`` (LPS, the same frame as the volume)."""
    d = np.asarray(volume.direction, dtype=float)
    sp = volume.spacing
    origin = np.asarray(volume.origin, dtype=float)
    ds.ImagePositionPatient = [_ds(v) for v in origin + d[:, 2] * sp[2] * k]
    ds.ImageOrientationPatient = [_ds(v) for v in list(d[:, 0]) + list(d[:, 1])]
    ds.PixelSpacing = [_ds(sp[1]), _ds(sp[0])]
    ds.SliceThickness = _ds(sp[2])
    ds.SpacingBetweenSlices = _ds(sp[2])
    ds.SliceLocation = _ds(float((origin + d[:, 2] * sp[2] * k) @ np.cross(d[:, 0], d[:, 1])))


def _fill_pixels(ds, plane: np.ndarray) -> None:
    """One 16-bit monochrome plane (signed when the volume was stored as int16)."""
    signed = plane.dtype == np.int16
    ds.Rows, ds.Columns = int(plane.shape[0]), int(plane.shape[1])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = np.ascontiguousarray(plane).astype("<i2" if signed else "<u2").tobytes()


def _integer_pixels(array: np.ndarray) -> np.ndarray:
    a = np.asarray(array)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8)
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)) or not np.array_equal(a, np.round(a)):
            raise VolumeError("write_dicom_series stores integers only; cast or rescale the image first")
    if a.size == 0:
        raise VolumeError("empty image")
    lo, hi = float(a.min()), float(a.max())
    if lo >= -32768 and hi <= 32767:
        return a.astype(np.int16)
    if lo >= 0 and hi <= 65535:
        return a.astype(np.uint16)
    raise VolumeError(f"voxel values {lo:g}..{hi:g} do not fit in 16 bits; rescale the image first")


def _ds(value: float) -> str:
    """A decimal string (VR DS) of at most 16 characters, as precise as that allows."""
    from pydicom.valuerep import format_number_as_ds

    value = float(value)
    if value == 0:
        return "0"
    return format_number_as_ds(value)
