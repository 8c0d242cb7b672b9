"""What computes the network when a request leaves ``--runtime`` at ``auto``: chosen per machine class.

The same rule serves the command (``lumbarseg segment``) and the warm worker behind the Slicer module
and the browser page, so a draft and a command on one machine run the same runtime and give the same
labels (docs/benchmarks.md measured each class):

* no GPU, OpenVINO installed, and a request OpenVINO serves as asked (the CPU, float32 or the automatic
  precision, the weights as stored): **OpenVINO**, on every CPU, in the engine's automatic precision
  for the CPU: bf16 where the CPU computes it natively (AVX-512 BF16, AMX; as PyTorch did there before,
  the report names it), float32 elsewhere (PyTorch float32's labels). The process never imports
  PyTorch (over a second and 400 MB of a cold command), and the network runs in about 0.6-0.8x
  PyTorch's time in the same precision;
* a GPU at hand, no OpenVINO, or a request for something else (``--bn-adapt``, ``--device cuda``):
  **PyTorch**, which runs every option.

Decided without importing PyTorch: the GPU from the driver's files.
"""
from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the options class only as a type: this module is read before the engine is imported
    from LumbarSegmentLib.inference.options import SegmentOptions


def gpu_present() -> bool:
    """Whether a GPU PyTorch could run on is likely here, found without importing PyTorch (a second and
    400 MB): an NVIDIA driver, or Apple silicon (MPS)."""
    import platform

    if sys.platform == "darwin":
        return platform.machine() == "arm64"
    if os.path.isdir("/proc/driver/nvidia/gpus"):
        return bool(os.listdir("/proc/driver/nvidia/gpus"))
    return sys.platform == "win32" and os.path.isfile(os.path.join(os.environ.get("SystemRoot", r"C:\Windows"),
                                                                   "System32", "nvcuda.dll"))


def machine_runtime(requested: str = "auto") -> str:
    """``requested`` unless it is ``auto``; then OpenVINO where no GPU is present and OpenVINO is installed,
    else PyTorch (the module doc says why)."""
    if requested != "auto":
        return requested
    from importlib.util import find_spec

    # the graph is converted through ONNX (PyTorch's exporter needs the onnx package) the first time
    missing = find_spec("openvino") is None or find_spec("onnx") is None
    return "torch" if missing or gpu_present() else "openvino"


def openvino_serves(options: SegmentOptions) -> bool:
    """Whether OpenVINO serves a request as asked: on the CPU, in float32, the automatic precision or
    bf16 on a CPU with bf16 arithmetic, the weights as stored. Anything else stays with PyTorch."""
    from dataclasses import replace

    from LumbarSegmentLib.inference.host_runner import runs_without_torch

    asked = replace(options, runtime="openvino")
    if not runs_without_torch([], asked):  # the engine's own test of what OpenVINO serves without PyTorch
        return False
    if asked.precision == "bf16":  # OpenVINO refuses bf16 on a CPU without it; PyTorch takes (or refuses) it
        from LumbarSegmentLib.inference.openvino_runner import cpu_has_bf16

        return cpu_has_bf16()
    return True


def auto_runtime(options: SegmentOptions, machine: str | None = None) -> str:
    """The runtime a request will run on: ``machine`` (default: :func:`machine_runtime`) for ``auto`` where
    OpenVINO serves the request as asked, else PyTorch. An explicit runtime stays, and so does ``auto``
    with ``--precision int8`` (a quantised network: OpenVINO's alone, the engine's choice)."""
    if options.runtime != "auto" or options.precision == "int8":
        return options.runtime
    return (machine or machine_runtime("auto")) if openvino_serves(options) else "torch"
