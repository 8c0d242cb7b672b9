"""Reading and writing volumes (NIfTI, NRRD, MetaImage, DICOM folders), atomically.

Every writer goes through :func:`atomic_path`: the file is written under a
temporary name in the target folder and renamed into place only once complete,
so a crash or a full disk never leaves a half-written label map behind.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from LumbarSegmentLib.core.files import atomic_path
from LumbarSegmentLib.core.volume import Volume, VolumeError, VolumeReadError

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
__all__ = ["VOLUME_SUFFIXES", "VolumeReadError", "atomic_path", "read_volume", "write_volume", "volume_suffix",
           "to_sitk"]


def volume_suffix(path: str | os.PathLike) -> str:
    name = Path(path).name.lower()
    for suf in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if name.endswith(suf):
            return suf
    return ""


def read_volume(path: str | os.PathLike, *, series_uid: str | None = None) -> Volume:
    """Read a volume file, or a DICOM series folder, into a :class:`Volume` (LPS geometry)."""
    p = Path(path)
    if not p.exists():
        raise VolumeReadError(f"{p}: no such file or folder")
    if p.is_dir():
        from LumbarSegmentLib.formats.dicom import read_dicom_series

        return read_dicom_series(p, series_uid=series_uid)
    if not volume_suffix(p):
        raise VolumeReadError(
            f"{p}: unsupported file type; expected one of {', '.join(VOLUME_SUFFIXES)} or a DICOM folder"
        )
    if not p.is_file():
        raise VolumeReadError(f"{p}: not a regular file (a pipe or device?); open the image file itself")
    if p.stat().st_size == 0:
        raise VolumeReadError(f"{p}: the file is empty (an interrupted copy or export?); copy or export it again")
    import SimpleITK as sitk

    from LumbarSegmentLib.formats.headers import check_volume_header

    check_volume_header(p, volume_suffix(p))  # before ITK follows the header anywhere

    try:
        image = sitk.ReadImage(str(p))
        array = sitk.GetArrayFromImage(image)
    except (RuntimeError, MemoryError, OverflowError, ValueError) as exc:
        detail = _itk_detail(exc).rstrip(".")
        raise VolumeReadError(f"{p}: cannot read the image (corrupt or truncated file?): {detail}. "
                              f"Copy or export the file again") from None
    if volume_suffix(p) in (".nii.gz", ".nii"):
        _check_nifti_complete(p, array.nbytes)
    return _volume_from_sitk(image, array, source=str(p))


def _itk_detail(exc: BaseException) -> str:
    """The informative line of an ITK/SimpleITK error (not the C++ source location)."""
    import re

    if isinstance(exc, MemoryError):
        return "its header asks for more memory than there is (a damaged header?)"
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    nrrd = [ln for ln in lines if ln.startswith("[nrrd]") and not ln.endswith((":", "trouble"))]
    if nrrd:
        return nrrd[-1].split(":", 1)[-1].strip()
    for ln in lines:
        m = re.match(r"(?:ITK ERROR|itk::ERROR): \w+\(0x[0-9a-fA-F]+\): (.*)", ln)
        if m:
            return m.group(1)
    plain = [ln for ln in lines if not ln.startswith("Exception thrown in SimpleITK")]
    return plain[-1] if plain else (lines[-1] if lines else type(exc).__name__)


def _check_nifti_complete(path: Path, data_bytes: int) -> None:
    """Refuse a truncated .nii or .nii.gz: ITK's NIfTI reader fills the missing voxels silently."""
    import gzip
    import math
    import struct
    import zlib

    total, head = 0, b""
    from LumbarSegmentLib.formats.headers import is_gzip

    compressed = is_gzip(path)  # by content: an uncompressed file named .nii.gz is read as what it is
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
            head = f.read(544)
            total = len(head) if compressed else path.stat().st_size
            while compressed and (chunk := f.read(1 << 22)):
                total += len(chunk)
    except (EOFError, OSError, zlib.error) as exc:
        raise VolumeReadError(f"{path}: cannot read the image (corrupt or truncated file?): "
                              f"the compressed data is incomplete ({exc}). Copy or export the file again") from None
    header_bytes = 348
    for order in ("<", ">"):
        if len(head) >= 4 and struct.unpack(order + "i", head[:4])[0] == 348 and len(head) >= 112:
            offset = struct.unpack(order + "f", head[108:112])[0]
            header_bytes = max(348, int(offset) if math.isfinite(offset) and offset < 2**62 else 0)
        elif len(head) >= 176 and struct.unpack(order + "i", head[:4])[0] == 540:
            header_bytes = max(540, int(struct.unpack(order + "q", head[168:176])[0]))
    if total < header_bytes + data_bytes:
        raise VolumeReadError(f"{path}: cannot read the image (corrupt or truncated file?): it holds "
                              f"{total} bytes of data where the header promises {header_bytes + data_bytes}. "
                              f"Copy or export the file again")


def _volume_from_sitk(image, array: np.ndarray, source: str) -> Volume:
    dim = image.GetDimension()
    if image.GetNumberOfComponentsPerPixel() > 1:
        raise VolumeReadError(
            f"{source}: has {image.GetNumberOfComponentsPerPixel()} components per voxel (colour/vector "
            f"image); LumbarSegment needs a single-channel MR volume: open the grey-scale MR series instead"
        )
    if dim != 3:
        if dim == 2:
            what, todo = "a 2D image (one slice)", "open the whole 3D series (a 3D file or the DICOM folder)"
        else:
            what, todo = f"a {dim}D image (e.g. a time series or several echoes)", \
                "extract one 3D volume from it first (one time point or echo)"
        raise VolumeReadError(f"{source}: is {what} with size {image.GetSize()}; LumbarSegment needs one 3D "
                              f"volume: {todo}")
    direction = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    try:
        return Volume(array, spacing=image.GetSpacing(), origin=image.GetOrigin(), direction=direction,
                      metadata={"source": source})
    except VolumeError as exc:
        raise VolumeReadError(f"{source}: {exc}") from None


def to_sitk(volume: Volume, array: np.ndarray | None = None):
    import SimpleITK as sitk

    arr = volume.array if array is None else array
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    elif arr.dtype == np.float16:  # no half-float voxel type in ITK files: widen (lossless)
        arr = arr.astype(np.float32)
    image = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    image.SetSpacing(volume.spacing)
    image.SetOrigin(volume.origin)
    image.SetDirection(tuple(np.asarray(volume.direction).ravel()))
    return image


def write_volume(volume: Volume, path: str | os.PathLike, *, compress: bool = True) -> Path:
    """Write ``volume`` to ``path`` (format from the suffix), atomically."""
    import SimpleITK as sitk

    path = Path(path)
    if not volume_suffix(path) or volume_suffix(path) in (".nhdr", ".mhd"):
        raise VolumeError(f"{path}: choose a single-file output type: .nii.gz, .nii, .nrrd or .mha")
    with atomic_path(path) as tmp:
        try:
            sitk.WriteImage(to_sitk(volume), str(tmp), compress)
        except RuntimeError as exc:
            raise OSError(f"could not write {path}: {str(exc).strip().splitlines()[-1]}") from None
    return path
