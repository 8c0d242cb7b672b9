"""Reading and writing volumes (NIfTI, NRRD, MetaImage, DICOM folders), atomically.

Every writer goes through :func:`atomic_path`: the file is written under a
temporary name in the target folder and renamed into place only once complete,
so a crash or a full disk never leaves a half-written label map behind.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np

from .volume import Volume, VolumeError

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


class VolumeReadError(VolumeError):
    """A file or folder could not be read as a volume."""


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
        from .dicom import read_dicom_series

        return read_dicom_series(p, series_uid=series_uid)
    if not volume_suffix(p):
        raise VolumeReadError(
            f"{p}: unsupported file type; expected one of {', '.join(VOLUME_SUFFIXES)} or a DICOM folder"
        )
    if p.stat().st_size == 0:
        raise VolumeReadError(f"{p}: the file is empty")
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(p))
        array = sitk.GetArrayFromImage(image)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = next((ln.strip() for ln in first if "rror" in ln or "xception" in ln), first[-1] if first else "")
        raise VolumeReadError(f"{p}: cannot read the image (corrupt or truncated file?): {detail}") from None
    if volume_suffix(p) == ".nii.gz":
        _check_nifti_gz_complete(p, array.nbytes)
    return _volume_from_sitk(image, array, source=str(p))


def _check_nifti_gz_complete(path: Path, data_bytes: int) -> None:
    """Refuse a truncated .nii.gz: ITK's NIfTI reader fills the missing voxels silently."""
    import gzip
    import struct
    import zlib

    total, head = 0, b""
    try:
        with gzip.open(path, "rb") as f:
            head = f.read(544)
            total = len(head)
            while chunk := f.read(1 << 22):
                total += len(chunk)
    except (EOFError, OSError, zlib.error) as exc:
        raise VolumeReadError(f"{path}: cannot read the image (corrupt or truncated file?): "
                              f"the compressed data is incomplete ({exc})") from None
    header_bytes = 348
    for order in ("<", ">"):
        if len(head) >= 4 and struct.unpack(order + "i", head[:4])[0] == 348 and len(head) >= 112:
            header_bytes = max(348, int(struct.unpack(order + "f", head[108:112])[0]))
        elif len(head) >= 176 and struct.unpack(order + "i", head[:4])[0] == 540:
            header_bytes = max(540, int(struct.unpack(order + "q", head[168:176])[0]))
    if total < header_bytes + data_bytes:
        raise VolumeReadError(f"{path}: cannot read the image (corrupt or truncated file?): it holds "
                              f"{total} bytes of data where the header promises {header_bytes + data_bytes}")


def _volume_from_sitk(image, array: np.ndarray, source: str) -> Volume:
    dim = image.GetDimension()
    if image.GetNumberOfComponentsPerPixel() > 1:
        raise VolumeReadError(
            f"{source}: has {image.GetNumberOfComponentsPerPixel()} components per voxel (colour/vector "
            f"image); LumbarSegment needs a single-channel MR volume"
        )
    if dim != 3:
        what = "a 2D image" if dim == 2 else f"a {dim}D image (e.g. a time series)"
        raise VolumeReadError(f"{source}: is {what} with size {image.GetSize()}; expected one 3D volume")
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
    image = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    image.SetSpacing(volume.spacing)
    image.SetOrigin(volume.origin)
    image.SetDirection(tuple(np.asarray(volume.direction).ravel()))
    return image


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike):
    """Yield a temporary path beside ``target``; rename it onto ``target`` only if the block succeeds."""
    target = Path(target)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise OSError(f"output folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"output folder {folder} is not writable")
    suffix = volume_suffix(target) or "".join(target.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial" + suffix, dir=folder)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
