"""DICOM series folders <-> :class:`Volume` (LPS geometry), with loud refusals.

Reading a folder is where wrong geometry usually sneaks in, so this module checks
rather than guesses:

* headers are read first (no pixels), files that are not DICOM and ``DICOMDIR``
  indexes are skipped silently (but counted, see ``metadata["dicom"]["skipped"]``);
* images are grouped by ``SeriesInstanceUID``; a folder holding several series is
  refused with a list of them unless the caller picks one (``series_uid=`` /
  ``--series``);
* slices are sorted by their position along the slice normal (the cross product of
  the two ``ImageOrientationPatient`` directions), never by file name or
  ``InstanceNumber``;
* a series with mixed orientations, pixel spacings or matrix sizes, with two
  slices at the same position, with a missing slice (a step more than 10 % off the
  median step) or with slices not stacked along their normal is refused, naming
  the slices concerned.

The volume's index axes are ``i`` = along a row (``ImageOrientationPatient[0:3]``),
``j`` = down a column (``[3:6]``), ``k`` = along the slice normal; its spacing is
``(PixelSpacing[1], PixelSpacing[0], slice step)`` and its origin is the
``ImagePositionPatient`` of the first slice. DICOM patient coordinates are LPS, the
same as :class:`Volume`, so no axis is flipped anywhere.

:func:`write_dicom_series` writes a plain uncompressed MR series (one file per
``k`` slice); the tests use it to turn real volumes into DICOM folders.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from LumbarSegmentLib.core.volume import Volume, VolumeError, VolumeReadError

# A step between neighbouring slices more than this fraction off the median step is a gap.
GAP_TOLERANCE = 0.10
# Two slices closer than this (mm, along the normal) sit at the same position.
DUPLICATE_TOLERANCE_MM = 1e-3
# Largest difference between two slices' direction cosines still counted as "the same orientation".
ORIENTATION_TOLERANCE = 1e-3
# Largest relative difference between two slices' pixel spacings still counted as equal.
SPACING_TOLERANCE = 1e-3
# Slices may drift sideways (within their own plane) by at most this fraction of a pixel.
SHEAR_TOLERANCE_PIXELS = 0.25

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # the SOP class of a DICOMDIR file


class DicomError(VolumeReadError):
    """A DICOM folder holds no usable series, several series, or a series that is not a clean stack."""


@dataclass
class _Slice:
    path: Path
    series_uid: str
    series_number: str
    description: str
    modality: str
    iop: np.ndarray  # (6,) row direction then column direction
    ipp: np.ndarray  # (3,) position of the first transmitted pixel, LPS mm
    pixel_spacing: tuple[float, float]  # (between rows, between columns)
    rows: int
    cols: int
    frames: int
    instance: int

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.iop[:3], self.iop[3:])


# ----------------------------------------------------------------------------------------
# reading
def read_dicom_series(folder: str | os.PathLike, series_uid: str | None = None) -> Volume:
    """Read one DICOM series from ``folder`` (searched recursively) into a :class:`Volume`.

    ``series_uid`` picks a series when the folder holds several. Raises
    :class:`DicomError` with a message naming the problem (and the files) otherwise.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DicomError(f"{folder}: not a folder")
    slices, skipped, incomplete = _scan_headers(folder)
    series = _group(slices)
    if not series:
        raise DicomError(f"{folder}: no DICOM image series found ({_describe_skipped(skipped)}); choose the "
                         f"folder that holds the series' image files, or open a .nii.gz/.nrrd/.mha volume")

    if series_uid is not None:
        if series_uid not in series:
            raise DicomError(
                f"{folder}: there is no series with SeriesInstanceUID {series_uid}. "
                f"The folder holds:\n{_list_series(series)}"
            )
        chosen = series[series_uid]
    elif len(series) > 1:
        raise DicomError(
            f"{folder}: holds {len(series)} DICOM series; choose one with series_uid=... "
            f"(command line: --series UID):\n{_list_series(series)}"
        )
    else:
        chosen = next(iter(series.values()))

    broken = incomplete.get(chosen[0].series_uid, [])
    if broken:
        names = ", ".join(str(b) for b in broken[:3]) + (f" and {len(broken) - 3} more" if len(broken) > 3 else "")
        raise DicomError(
            f"{folder}: series {chosen[0].series_uid}: {len(broken)} of its {len(broken) + len(chosen)} images lack "
            f"their position or pixel spacing (ImagePositionPatient, ImageOrientationPatient, PixelSpacing): "
            f"{names}. Reading the rest would leave a hole in the stack; re-export the complete series"
        )
    ordered, step = _check_and_sort(chosen, folder)
    array = _read_pixels(ordered, folder)
    first = ordered[0]
    # ImageOrientationPatient is often written with few digits: re-orthonormalise it (the
    # deviation was checked to be small in _check_and_sort)
    row_dir = first.iop[:3] / np.linalg.norm(first.iop[:3])
    col_dir = first.iop[3:] - (first.iop[3:] @ row_dir) * row_dir
    col_dir = col_dir / np.linalg.norm(col_dir)
    direction = np.column_stack([row_dir, col_dir, np.cross(row_dir, col_dir)])
    spacing = (first.pixel_spacing[1], first.pixel_spacing[0], step)
    meta = {
        "source": str(folder),
        "dicom": {
            "series_uid": first.series_uid,
            "series_number": first.series_number,
            "series_description": first.description,
            "modality": first.modality,
            "images": len(ordered),
            "files": [str(s.path) for s in ordered],
            "skipped": skipped,
        },
    }
    try:
        return Volume(array, spacing=spacing, origin=tuple(first.ipp), direction=direction, metadata=meta)
    except VolumeError as exc:
        raise DicomError(f"{folder}: series {first.series_uid}: {exc}") from None


def _scan_headers(folder: Path) -> tuple[list[_Slice], dict, dict]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    slices: list[_Slice] = []
    incomplete: dict[str, list[Path]] = {}
    skipped = {"not_dicom": 0, "dicomdir": 0, "unreadable": 0, "without_image_geometry": 0}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if path.name.upper() == "DICOMDIR":
            skipped["dicomdir"] += 1
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=False)
        except InvalidDicomError:
            skipped["not_dicom"] += 1
            continue
        except Exception:  # truncated or otherwise broken DICOM file  # noqa: BLE001
            skipped["unreadable"] += 1
            continue
        meta = getattr(ds, "file_meta", None)
        sop_class = str(getattr(meta, "MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", ""))
        if sop_class == MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds:
            skipped["dicomdir"] += 1
            continue
        try:
            record = _Slice(
                path=path,
                series_uid=str(ds.SeriesInstanceUID),
                series_number=str(ds.get("SeriesNumber", "") or ""),
                description=str(ds.get("SeriesDescription", "") or ""),
                modality=str(ds.get("Modality", "") or ""),
                iop=np.array([float(v) for v in ds.ImageOrientationPatient], dtype=float),
                ipp=np.array([float(v) for v in ds.ImagePositionPatient], dtype=float),
                pixel_spacing=tuple(float(v) for v in ds.PixelSpacing),
                rows=int(ds.Rows),
                cols=int(ds.Columns),
                frames=int(ds.get("NumberOfFrames", 1) or 1),
                instance=int(ds.get("InstanceNumber", 0) or 0),
            )
        except (AttributeError, KeyError, TypeError, ValueError):
            # reports, presentation states, screenshots, enhanced multi-frame objects without
            # per-slice geometry at the top level, ...
            _note_incomplete(ds, path, incomplete)
            skipped["without_image_geometry"] += 1
            continue
        if record.iop.shape != (6,) or record.ipp.shape != (3,) or len(record.pixel_spacing) != 2:
            _note_incomplete(ds, path, incomplete)
            skipped["without_image_geometry"] += 1
            continue
        slices.append(record)
    return slices, skipped, incomplete


def _note_incomplete(ds, path: Path, incomplete: dict) -> None:
    """Remember an image of a series that lacks its geometry: dropping it would leave a hole in the stack."""
    uid = ds.get("SeriesInstanceUID")
    if uid and ("Rows" in ds or "PixelData" in ds or "NumberOfFrames" in ds):
        incomplete.setdefault(str(uid), []).append(path)


def _describe_skipped(skipped: dict) -> str:
    parts = [f"{n} {what.replace('_', ' ')}" for what, n in skipped.items() if n]
    return "skipped: " + ", ".join(parts) if parts else "the folder holds no files"


def _group(slices: list[_Slice]) -> dict[str, list[_Slice]]:
    series: dict[str, list[_Slice]] = {}
    for s in slices:
        series.setdefault(s.series_uid, []).append(s)
    return series


def _orientation_name(s: _Slice) -> str:
    from LumbarSegmentLib.core.geometry import axis_codes

    n = s.normal
    d = np.column_stack([s.iop[:3], s.iop[3:], n / max(np.linalg.norm(n), 1e-12)])
    plane = {0: "sagittal", 1: "coronal", 2: "axial"}[int(np.argmax(np.abs(n)))]
    return f"{plane} ({axis_codes(d)})"


def _list_series(series: dict[str, list[_Slice]]) -> str:
    lines = []
    for uid, items in series.items():
        s = items[0]
        number = f"#{s.series_number} " if s.series_number else ""
        desc = s.description or "(no description)"
        lines.append(f"  - {uid}: {number}{desc!r}, {len(items)} image(s), {_orientation_name(s)}, "
                     f"{s.rows}x{s.cols} pixels")
    return "\n".join(lines)


def _name(s: _Slice) -> str:
    return s.path.name


def _where(s: _Slice, folder: Path) -> str:
    return str(s.path)  # the full path: the file may sit in a sub-folder of ``folder``


def _check_and_sort(items: list[_Slice], folder: Path) -> tuple[list[_Slice], float]:
    """Check that ``items`` form one clean stack; return them sorted along the normal and the step (mm)."""
    uid = items[0].series_uid
    where = f"{folder}: series {uid}"
    multi = [s for s in items if s.frames > 1]
    if multi:
        raise DicomError(
            f"{where}: {_name(multi[0])} is a multi-frame (enhanced) DICOM object with {multi[0].frames} "
            f"frames; only one-image-per-file series are supported. Convert it first (e.g. with "
            f"dcm2niix) and open the NIfTI file."
        )
    ref = items[0]
    row, col = ref.iop[:3], ref.iop[3:]
    if (abs(np.linalg.norm(row) - 1) > 1e-2 or abs(np.linalg.norm(col) - 1) > 1e-2
            or abs(float(row @ col)) > 1e-2):
        raise DicomError(f"{where}: {_name(ref)} has an invalid ImageOrientationPatient "
                         f"{ref.iop.tolist()} (not two orthogonal unit vectors)")
    for s in items[1:]:
        if np.max(np.abs(s.iop - ref.iop)) > ORIENTATION_TOLERANCE:
            raise DicomError(
                f"{where}: inconsistent orientation: {_name(s)} has ImageOrientationPatient "
                f"{np.round(s.iop, 5).tolist()} but {_name(ref)} has {np.round(ref.iop, 5).tolist()} "
                f"(a localizer or a mixed series?)"
            )
        if not np.allclose(s.pixel_spacing, ref.pixel_spacing, rtol=SPACING_TOLERANCE, atol=0):
            raise DicomError(
                f"{where}: inconsistent pixel spacing: {_name(s)} has PixelSpacing "
                f"{list(s.pixel_spacing)} but {_name(ref)} has {list(ref.pixel_spacing)}"
            )
        if (s.rows, s.cols) != (ref.rows, ref.cols):
            raise DicomError(
                f"{where}: inconsistent image size: {_name(s)} is {s.rows}x{s.cols} pixels "
                f"(rows x columns) but {_name(ref)} is {ref.rows}x{ref.cols}"
            )
    normal = ref.normal / np.linalg.norm(ref.normal)
    ordered = sorted(items, key=lambda s: (float(s.ipp @ normal), s.instance, str(s.path)))
    pos = np.array([float(s.ipp @ normal) for s in ordered])
    if len(ordered) == 1:
        step = _single_slice_thickness(ordered[0])
        return ordered, step

    diffs = np.diff(pos)
    dup = np.nonzero(diffs < DUPLICATE_TOLERANCE_MM)[0]
    if dup.size:
        a, b = ordered[dup[0]], ordered[dup[0] + 1]
        more = f" ({dup.size} such pairs)" if dup.size > 1 else ""
        raise DicomError(
            f"{where}: duplicate slice position: {_name(a)} and {_name(b)} both lie at {pos[dup[0]]:.3f} mm "
            f"along the slice normal{more}. The series holds more than one image per position "
            f"(a copied file, several echoes or time points?); remove the extra images or pick "
            f"another series."
        )
    median = float(np.median(diffs))
    off = np.nonzero(np.abs(diffs - median) > GAP_TOLERANCE * median)[0]
    if off.size:
        g = int(off[np.argmax(np.abs(diffs[off] - median))])
        a, b = ordered[g], ordered[g + 1]
        if diffs[g] > median:
            missing = int(round(diffs[g] / median)) - 1
            what = (f"gap in the slice stack (about {missing} missing slice(s)?)" if missing >= 1
                    else "irregular slice spacing")
        else:
            what = "irregular slice spacing"
        raise DicomError(
            f"{where}: {what}: {diffs[g]:.3f} mm between {_name(a)} (at {pos[g]:.3f} mm) and "
            f"{_name(b)} (at {pos[g + 1]:.3f} mm), while the usual step is {median:.3f} mm "
            f"({off.size} irregular step(s) in all). Re-export the complete series."
        )
    # Slices must be stacked straight along their normal, or one slice step cannot describe them.
    offsets = np.array([s.ipp - ordered[0].ipp for s in ordered])
    sideways = offsets - np.outer(offsets @ normal, normal)
    drift = np.linalg.norm(sideways, axis=1)
    limit = SHEAR_TOLERANCE_PIXELS * min(ref.pixel_spacing)
    if drift.max() > limit:
        worst = int(np.argmax(drift))
        raise DicomError(
            f"{where}: the slices are not stacked along their normal: {_name(ordered[worst])} is shifted "
            f"{drift[worst]:.3f} mm sideways relative to {_name(ordered[0])} (sheared or gantry-tilted "
            f"stack); it cannot be represented as a regular grid without resampling."
        )
    step = float((pos[-1] - pos[0]) / (len(pos) - 1))
    return ordered, step


def _single_slice_thickness(s: _Slice) -> float:
    import pydicom

    ds = pydicom.dcmread(s.path, stop_before_pixels=True)
    for key in ("SpacingBetweenSlices", "SliceThickness"):
        try:
            value = float(ds.get(key, 0) or 0)
        except (TypeError, ValueError):
            value = 0.0
        if value > 0:
            return value
    return 1.0


def _read_pixels(ordered: list[_Slice], folder: Path) -> np.ndarray:
    import pydicom

    planes = []
    scales = []
    for s in ordered:
        ds = pydicom.dcmread(s.path, force=False)
        if "PixelData" not in ds:
            raise DicomError(f"{_where(s, folder)}: has no pixel data")
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise DicomError(f"{_where(s, folder)}: is a colour image ({ds.get('PhotometricInterpretation', '?')}); "
                             f"LumbarSegment needs a grey-scale MR series")
        syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        try:
            plane = ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - decoders raise all sorts of things
            name = getattr(syntax, "name", str(syntax)) if syntax is not None else "unknown"
            if syntax is not None and getattr(syntax, "is_compressed", False):
                raise DicomError(
                    f"{_where(s, folder)}: pixel data is compressed ({name}, transfer syntax {syntax}) and cannot be "
                    f"decoded here ({type(exc).__name__}: {exc}). Install a decoder for pydicom "
                    f"(e.g. pylibjpeg with its plugins, or python-gdcm), or decompress the series first "
                    f"(e.g. gdcmconv --raw, dcmdjpeg)."
                ) from None
            raise DicomError(f"{_where(s, folder)}: cannot decode the pixel data "
                             f"({type(exc).__name__}: {exc})") from None
        if plane.shape != (s.rows, s.cols):
            raise DicomError(f"{_where(s, folder)}: pixel data has shape {plane.shape}, expected "
                             f"{s.rows}x{s.cols} (rows x columns)")
        planes.append(plane)
        scales.append(_rescale(ds, s, folder))

    stored = np.stack(planes)
    if all(sc == (1.0, 0.0) for sc in scales):
        return stored
    slopes = np.array([sc[0] for sc in scales])[:, None, None]
    intercepts = np.array([sc[1] for sc in scales])[:, None, None]
    integral = (np.all(slopes == np.round(slopes)) and np.all(intercepts == np.round(intercepts))
                and np.all(np.abs(slopes) < 2**16) and np.all(np.abs(intercepts) < 2**31))
    if integral:
        values = stored.astype(np.int64) * slopes.astype(np.int64) + intercepts.astype(np.int64)
        for dtype in (np.int16, np.int32):
            info = np.iinfo(dtype)
            if values.min() >= info.min and values.max() <= info.max:
                return values.astype(dtype)
        return values
    with np.errstate(over="ignore", invalid="ignore"):
        values = stored.astype(np.float64) * slopes + intercepts
    big = float(np.max(np.abs(values))) if values.size else 0.0
    if not np.isfinite(big) or big > np.finfo(np.float32).max:
        worst = int(np.argmax(np.abs(slopes.ravel()) + np.abs(intercepts.ravel())))
        raise DicomError(f"{_where(ordered[worst], folder)}: RescaleSlope {slopes.ravel()[worst]:g} / "
                         f"RescaleIntercept {intercepts.ravel()[worst]:g} turn the pixels into values too large "
                         f"to store (the header is damaged); fix or remove the rescale tags, or re-export the series")
    return values.astype(np.float32)


def _rescale(ds, s: _Slice, folder: Path) -> tuple[float, float]:
    """``(RescaleSlope, RescaleIntercept)`` as finite numbers, or an error naming the file."""
    out = []
    for key, default in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0)):
        raw = None
        try:
            raw = ds.get(key, default)
            value = float(raw if raw not in (None, "") else default)
        except (TypeError, ValueError, OverflowError):
            raw = raw if raw is not None else ds.get_item(key).value if key in ds else "?"
            raise DicomError(f"{_where(s, folder)}: {key} {str(raw)!r} is not a number; fix the tag or "
                             f"re-export the series") from None
        if not np.isfinite(value):
            raise DicomError(f"{_where(s, folder)}: {key} {value} is not a finite number; fix the tag or "
                             f"re-export the series")
        out.append(value)
    if out[0] == 0:
        out[0] = 1.0  # a zero slope is a common way of writing "no rescale"
    return out[0], out[1]


# ----------------------------------------------------------------------------------------
# writing (for tests and demos)
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
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    pixels = _integer_pixels(volume.array)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_uid = generate_uid()
    d = np.asarray(volume.direction, dtype=float)
    sp = volume.spacing
    iop = [_ds(v) for v in list(d[:, 0]) + list(d[:, 1])]
    origin = np.asarray(volume.origin, dtype=float)
    signed = pixels.dtype == np.int16
    paths = []
    n = pixels.shape[0]
    width = max(4, len(str(n)))
    for k in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        sop_uid = generate_uid()
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"{prefix}{k + 1:0{width}d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = MR_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
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
        ds.SeriesNumber = int(series_number)
        ds.SeriesDescription = description[:64]
        ds.InstanceNumber = k + 1
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.EchoTime = ""
        ds.RepetitionTime = ""
        ds.EchoTrainLength = ""
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [_ds(v) for v in origin + d[:, 2] * sp[2] * k]
        ds.ImageOrientationPatient = iop
        ds.PixelSpacing = [_ds(sp[1]), _ds(sp[0])]
        ds.SliceThickness = _ds(sp[2])
        ds.SpacingBetweenSlices = _ds(sp[2])
        ds.SliceLocation = _ds(float((origin + d[:, 2] * sp[2] * k) @ np.cross(d[:, 0], d[:, 1])))
        ds.Rows, ds.Columns = int(pixels.shape[1]), int(pixels.shape[2])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1 if signed else 0
        ds.PixelData = np.ascontiguousarray(pixels[k]).astype("<i2" if signed else "<u2").tobytes()
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


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
