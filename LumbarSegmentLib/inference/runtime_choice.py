"""What computes the network when a request leaves ``--runtime`` at ``auto``: chosen per machine class.

The same rule serves the command (``lumbarseg segment``) and the warm worker behind the Slicer module
and the browser page, so a draft and a command on one machine run the same runtime and give the same
labels (docs/benchmarks.md measured each class):

* no GPU, OpenVINO installed, and a request OpenVINO serves as asked (the CPU, float32 or the automatic
  precision, the weights as stored): **OpenVINO float32**, on every CPU. It gives PyTorch float32's
  labels, so the same input gets the same labels on a laptop without bf16 and on a workstation with it,
  and the process never imports PyTorch (over a second and 400 MB of a cold command). On a CPU without
  bf16 it computes in about two thirds of PyTorch's time; on a CPU with bf16 a cold command takes half
  of PyTorch bf16's, and a warm draft about as long. bf16 (OpenVINO's or PyTorch's) is a lossy step
  and an option: ``--precision bf16``;
* a GPU at hand, no OpenVINO, or a request for something else (``--bn-adapt``, ``--device cuda``,
  ``--precision bf16``): **PyTorch**, which runs every option (and whose automatic precision is bf16 on
  CPUs with bf16 arithmetic).

Decided without importing PyTorch: the GPU from the driver's files.
"""
from __future__ import annotations

import os
import sys


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

    return "torch" if find_spec("openvino") is None or gpu_present() else "openvino"


def plain_cpu(args) -> bool:
    """Whether a request (parsed ``segment`` arguments) is one OpenVINO serves as asked: on the CPU, in
    float32 or the automatic precision, the weights as stored. Anything else stays with PyTorch."""
    return (args.device in ("auto", "cpu") and args.precision in ("auto", "fp32")
            and not getattr(args, "bn_adapt", 0))


def resolve_auto_runtime(args, machine: str | None = None) -> None:
    """Turn ``args.runtime == "auto"`` into the runtime that will run (in place): ``machine`` (default:
    :func:`machine_runtime`) for a plain CPU request, else PyTorch. An explicit runtime is left alone, and
    so is ``auto`` with ``--precision int8`` (a quantised network: OpenVINO's alone, the engine's choice)."""
    if getattr(args, "runtime", "auto") != "auto" or getattr(args, "precision", "auto") == "int8":
        return
    args.runtime = (machine or machine_runtime("auto")) if plain_cpu(args) else "torch"
