"""Checks on a volume file's header, made before any voxel is read.

A volume file's header can make a reader do things its user never asked for: read
voxels from another file anywhere on the disk (MetaImage ``ElementDataFile``, NRRD
``data file``), block forever on a FIFO, allocate gigabytes for a file of a few
kilobytes, or pick one of two contradicting orientations (NIfTI qform and sform).
Each check here refuses such a file with a message that names the problem.
"""
from __future__ import annotations

import math
import os
import stat
import struct
from pathlib import Path

from LumbarSegmentLib.core.volume import VolumeReadError

# More voxels than any spine MR (a 1024 x 1024 x 1024 volume); beyond this a header is damaged or hostile.
MAX_VOXELS = 1 << 30
_HEADER_READ = 1 << 16  # text headers are short; never read a (possibly huge) file whole to parse one


def check_volume_header(path: Path, suffix: str) -> None:
    """Run every check that applies to ``path`` (``suffix`` as found by ``io.volume_suffix``)."""
    if suffix in (".mha", ".mhd"):
        _check_data_files(path, _metaimage_data_files(path))
    elif suffix in (".nrrd", ".nhdr"):
        _check_data_files(path, _nrrd_data_files(path))
    check_declared_size(path)
    if suffix in (".nii", ".nii.gz"):
        check_nifti_orientation(path)


def is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


# ------------------------------------------------------------------------ detached data files
def _text_header(path: Path, nrrd: bool) -> list[str]:
    with open(path, "rb") as f:
        raw = f.read(_HEADER_READ)
    if nrrd:  # the header ends at the first empty line; binary voxels may follow
        raw = raw.split(b"\n\n", 1)[0].split(b"\r\n\r\n", 1)[0]
    return raw.decode("latin-1").splitlines()


def _metaimage_data_files(path: Path) -> list[str]:
    for line in _text_header(path, nrrd=False):
        key, sep, value = line.partition("=")
        if sep and key.strip().lower() == "elementdatafile":
            value = value.strip()
            return [] if value.upper() == "LOCAL" else [value]
    return []


def _nrrd_data_files(path: Path) -> list[str]:
    lines = _text_header(path, nrrd=True)
    for n, line in enumerate(lines):
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("data file", "datafile"):
            value = value.lstrip("=").strip()
            if value.upper().startswith("LIST"):  # the file names follow, one a line
                return ["LIST"] + [ln.strip() for ln in lines[n + 1:] if ln.strip()]
            return [value]
    return []


def _check_data_files(header: Path, names: list[str]) -> None:
    """Detached voxel files must be plain regular files in the header's own folder (or below it)."""
    if not names:
        return
    if names[0] == "LIST" or "%" in names[0] or names[0].upper().startswith("LIST"):
        raise VolumeReadError(f"{header}: its voxels are spread over a list or pattern of files; LumbarSegment "
                              f"reads one data file per header. Convert the image to a single .nrrd/.mha/.nii.gz "
                              f"file first")
    folder = header.resolve().parent
    for name in names:
        bad = os.path.isabs(name) or Path(name).drive or ".." in Path(name.replace("\\", "/")).parts
        target = (folder / name).resolve()
        if bad or (target != folder and folder not in target.parents):
            raise VolumeReadError(f"{header}: its header points at a data file outside its own folder ({name!r}); "
                                  f"refused, because a header must not make LumbarSegment read other files. Keep "
                                  f"the header and its data file side by side and name the data file plainly")
        try:
            mode = os.stat(target).st_mode
        except OSError:
            raise VolumeReadError(f"{header}: its data file {name!r} is missing; copy the header together with "
                                  f"its data file") from None
        if not stat.S_ISREG(mode):
            raise VolumeReadError(f"{header}: its data file {name!r} is not a regular file (a pipe, device or "
                                  f"folder); refused. Point the header at the real data file")


def data_files(path: Path, suffix: str) -> list[Path]:
    """The detached voxel files a header names (for telling an output from an input); [] if inline."""
    names = (_metaimage_data_files(path) if suffix in (".mha", ".mhd") else
             _nrrd_data_files(path) if suffix in (".nrrd", ".nhdr") else [])
    if names[:1] == ["LIST"]:
        names = names[1:]
    return [(path.parent / n) for n in names if n and "%" not in n]


# ------------------------------------------------------------------------ declared size
def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def check_declared_size(path: Path) -> None:
    """Refuse a header that declares more voxels than is sane, or than memory could hold."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return  # the real read reports the damage, with its own message
    size = tuple(int(s) for s in reader.GetSize())
    voxels = math.prod(size)
    bytes_per = max(1, reader.GetNumberOfComponents()) * _component_bytes(reader.GetPixelID())
    need = voxels * (bytes_per + 5)  # the voxels, one float32 copy and the label map
    shown = " x ".join(str(s) for s in size)
    if voxels > MAX_VOXELS:
        raise VolumeReadError(f"{path}: its header declares {shown} voxels ({voxels:,}), far more than any spine "
                              f"MR (at most {MAX_VOXELS:,} are accepted); the header is damaged. Copy or export "
                              f"the file again")
    free = _available_memory()
    if free is not None and need > free:
        raise VolumeReadError(f"{path}: its header declares {shown} voxels, which would need about "
                              f"{need / 2**30:.1f} GiB of memory where {free / 2**30:.1f} GiB are free; close other "
                              f"programs, or crop or downsample the image first")


def _component_bytes(pixel_id: int) -> int:
    import SimpleITK as sitk

    widths = {sitk.sitkUInt8: 1, sitk.sitkInt8: 1, sitk.sitkUInt16: 2, sitk.sitkInt16: 2, sitk.sitkUInt32: 4,
              sitk.sitkInt32: 4, sitk.sitkUInt64: 8, sitk.sitkInt64: 8, sitk.sitkFloat32: 4, sitk.sitkFloat64: 8}
    return widths.get(pixel_id, 8)


# ------------------------------------------------------------------------ NIfTI qform / sform
def _nifti_header(path: Path) -> bytes:
    import gzip
    import zlib

    try:
        with (gzip.open(path, "rb") if is_gzip(path) else open(path, "rb")) as f:
            return f.read(348)
    except (OSError, EOFError, zlib.error):
        return b""


def nifti_affines(path: Path):
    """``(qform_code, qform 4x4, sform_code, sform 4x4)`` in RAS, or ``None`` for a non-NIfTI-1 header."""
    import numpy as np

    h = _nifti_header(path)
    if len(h) < 348:
        return None
    order = next((o for o in "<>" if struct.unpack(o + "i", h[:4])[0] == 348), None)
    if order is None:
        return None
    pixdim = struct.unpack(order + "8f", h[76:108])
    qcode, scode = struct.unpack(order + "2h", h[252:256])
    b, c, d, qx, qy, qz = struct.unpack(order + "6f", h[256:280])
    srow = np.array(struct.unpack(order + "12f", h[280:328]), dtype=float).reshape(3, 4)
    a2 = 1.0 - (b * b + c * c + d * d)
    a = math.sqrt(a2) if a2 > 1e-7 else 0.0
    rot = np.array([[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                    [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
                    [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b]])
    qfac = -1.0 if pixdim[0] < 0 else 1.0
    q = np.eye(4)
    q[:3, :3] = rot @ np.diag([pixdim[1], pixdim[2], pixdim[3] * qfac])
    q[:3, 3] = (qx, qy, qz)
    s = np.eye(4)
    s[:3, :] = srow
    return qcode, q, scode, s


def check_nifti_orientation(path: Path, tol_mm: float = 0.1) -> None:
    """Refuse a NIfTI file whose qform and sform both claim to be valid but place the voxels differently."""
    import numpy as np

    aff = nifti_affines(path)
    if aff is None:
        return
    qcode, q, scode, s = aff
    if qcode <= 0 or scode <= 0 or not (np.all(np.isfinite(q)) and np.all(np.isfinite(s))):
        return
    # compare where the corners of a 100-voxel cube land: covers rotation, scale and shift at once
    corners = np.array([[i, j, k, 1.0] for i in (0, 100) for j in (0, 100) for k in (0, 100)]).T
    off = float(np.max(np.linalg.norm((q @ corners - s @ corners)[:3], axis=0)))
    if off > tol_mm:
        raise VolumeReadError(
            f"{path}: its NIfTI header holds two orientations that disagree (qform and sform place the image up to "
            f"{off:.1f} mm apart); it is not clear which one is right, so the file is refused rather than read "
            f"with a guess. Make them agree (e.g. fslorient -copysform2qform, or nibabel set_qform from the "
            f"correct one) and try again")
