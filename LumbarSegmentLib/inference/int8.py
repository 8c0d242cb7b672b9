"""int8 networks for OpenVINO: the weights and activations quantised after training, calibrated on shipped
training slices.

Why: on a CPU without bf16 arithmetic (most laptops: AVX2 only) the network in float32 is most of a draft's
time and already runs near the cores' float32 peak (docs/benchmarks.md). 8-bit integer arithmetic does about
twice the work per instruction there (and on CPUs with VNNI more), so the same network costs about half. It is
a lossy step: it runs only when asked for (``--precision int8``, with ``--runtime auto`` or ``openvino``),
and docs/benchmarks.md says what it changes.

How: post-training quantisation with NNCF (OpenVINO's own quantisation library) of the float32 graph that
:mod:`openvino_runner` already converts per plane size. The activation ranges are measured on windows cut
from the shipped replay slices (``Resources/Replay``: training cases of each source the shipped models were
trained on, never a validation or test case), preprocessed exactly as the engine preprocesses a volume. The
quantised graph is cached like the float32 one, its name also carrying :func:`calibration_tag` (the
calibration files, this module's settings and NNCF's version), so the calibration is paid once per model and
plane size (seconds); later runs only read and compile it, with neither NNCF nor PyTorch imported.

Optional dependency: ``pip install nncf`` (the ``fast`` extra), only needed the first time a model is
quantised for a plane size.
"""
from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import numpy as np

from LumbarSegmentLib.core.files import shipped_folder
from LumbarSegmentLib.inference.devices import EngineError

INT8_HINT = ("--precision int8 quantises the network once per model and plane size with NNCF, which is not "
             "installed: pip install nncf (or the 'fast' extra of lumbarsegment); or use --precision fp32")
SETTINGS = "v1-mixed-fastbias-3slices"  # part of the cache name: change it when the recipe below changes


def calibration_folder() -> Path:
    """The shipped replay set (training slices of every shipped source)."""
    return shipped_folder("shipped_replay", "Replay")


def calibration_images() -> list[Path]:
    return sorted(calibration_folder().glob("*_image.mha"))


@lru_cache(maxsize=1)
def calibration_tag() -> str:
    """Short fingerprint of what the quantisation depends on besides the float32 graph: the calibration
    images (names and bytes), this module's recipe and NNCF's version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        nncf = version("nncf")
    except PackageNotFoundError:
        nncf = "none"
    h = hashlib.sha256(f"{SETTINGS}|nncf {nncf}".encode())
    for path in calibration_images():
        h.update(path.name.encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:12]


def _fit(planes: np.ndarray, height: int, width: int) -> np.ndarray:
    """``[C, h, w]`` cut (centrally) or zero-padded (at the bottom and right, as the engine pads a window)
    to ``[C, height, width]``."""
    _, h, w = planes.shape
    y0, x0 = max(0, (h - height) // 2), max(0, (w - width) // 2)
    planes = planes[:, y0:y0 + height, x0:x0 + width]
    out = np.zeros((planes.shape[0], height, width), dtype=np.float32)
    out[:, :planes.shape[1], :planes.shape[2]] = planes
    return out


def calibration_windows(spec, shape: tuple) -> list[np.ndarray]:
    """Network inputs ``[1, C, H, W]`` for ``shape = (C, H, W)`` from the calibration images, each volume
    preprocessed at the model's spacing and normalisation, slices at a quarter, half and three quarters of
    each stack (2.5D models: with their neighbours); a click-guided model's click maps stay empty, as in a
    draft. ``spec`` is the model's :class:`runners.LoadedModel`."""
    from LumbarSegmentLib.formats.io import read_volume
    from LumbarSegmentLib.inference.preprocess import model_slices
    from LumbarSegmentLib.inference.slice_smoothing import slice_inputs

    channels, height, width = (int(n) for n in shape)
    images = calibration_images()
    if not images:
        raise EngineError(f"--precision int8 is calibrated on the shipped replay slices, which are missing "
                          f"({calibration_folder()}); reinstall LumbarSegment or use --precision fp32")
    windows = []
    for path in images:
        stack = model_slices(read_volume(str(path)), tuple(spec.spacing), normalisation=spec.normalisation,
                             arrays="numpy")[0]
        picks = sorted({min(stack.shape[0] - 1, (stack.shape[0] * q) // 4) for q in (1, 2, 3)})
        for planes in np.asarray(slice_inputs(stack, picks, spec.slice_context), dtype=np.float32):
            extra = channels - planes.shape[0]
            if extra > 0:
                planes = np.concatenate([planes, np.zeros((extra,) + planes.shape[1:], np.float32)])
            windows.append(_fit(planes, height, width)[None])
    return windows


def quantise(model, windows: list[np.ndarray]):
    """The float32 OpenVINO ``model`` quantised to int8 (weights per channel, activations per tensor with an
    asymmetric range: the networks' PReLU and softmax inputs are not symmetric about zero), activation
    ranges from ``windows``; the softmax at the end stays float32."""
    try:
        import nncf
    except ImportError:
        raise EngineError(INT8_HINT) from None
    import contextlib
    import io
    import logging

    nncf.set_log_level(logging.ERROR)  # its notes and progress bars are not the user's: kept off the console
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return nncf.quantize(model, nncf.Dataset(windows), preset=nncf.QuantizationPreset.MIXED,
                             subset_size=len(windows), fast_bias_correction=True)
