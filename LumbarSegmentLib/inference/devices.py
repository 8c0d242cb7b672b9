"""Where a model runs and in which precision: the one home of these choices.

The engine, the trainer and every command that takes ``--device``/``--precision`` call these
functions, so "auto" means the same thing everywhere:

* device ``auto``: CUDA, then Apple MPS, then the CPU;
* precision ``auto``: bf16 autocast on CUDA GPUs that support it (fp16 otherwise), bf16 on
  CPUs with native bf16 (AVX-512 BF16 / AMX: about 2.5x faster than fp32 on this project's
  2-core CI machine), plain fp32 elsewhere. ``fp32`` turns autocast off.

Nothing here imports torch at module import time: the CLI imports this before torch so that
``engine`` can still choose the OpenMP wait policy.
"""
from __future__ import annotations

import contextlib

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")  # int8: OpenVINO only (openvino_runner)


class EngineError(RuntimeError):
    """The run cannot proceed as configured (device, precision, models, options)."""


class DeviceError(EngineError):
    """The requested device or precision is not available here."""


def pick_device(name: str = "auto", local_rank: int | None = None):
    """``torch.device`` for ``name`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``)."""
    import torch

    name = str(name or "auto")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank) if local_rank is not None else torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError("device 'cuda' was requested but no CUDA GPU is available to PyTorch "
                          f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}); use --device cpu "
                          "or install a CUDA build of PyTorch")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeviceError("device 'mps' was requested but Apple MPS is not available")
    if name not in DEVICES and not name.startswith("cuda:"):
        raise DeviceError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)} or cuda:N")
    dev = torch.device(name)
    if dev.type == "cuda" and dev.index is None and local_rank is not None:
        dev = torch.device("cuda", local_rank)
    return dev


def cpu_has_bf16() -> bool:
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # pragma: no cover - older torch
        return False


def autocast_dtype(device, precision: str = "auto"):
    """The autocast dtype for ``device`` under ``precision`` (None = plain fp32)."""
    import torch

    if precision not in PRECISIONS:
        raise DeviceError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision in ("fp32", "int8"):  # int8 is OpenVINO's (the PyTorch network is then only exported)
        return None
    if device.type == "cuda":
        if precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()):
            return torch.bfloat16
        return torch.float16
    if device.type == "cpu":
        if precision == "fp16":
            raise DeviceError("fp16 autocast is for GPUs; use --precision bf16 or fp32 on the CPU")
        if precision in ("bf16", "auto") and cpu_has_bf16():
            return torch.bfloat16
        if precision == "bf16":
            raise DeviceError("bf16 was requested but this CPU has no bf16 support; use --precision fp32")
        return None
    return torch.float16 if precision in ("fp16", "auto") else None


def precision_name(dtype) -> str:
    """``fp32`` / ``bf16`` / ``fp16`` for an autocast dtype (None = fp32)."""
    return {None: "fp32"}.get(dtype) or {"torch.bfloat16": "bf16", "torch.float16": "fp16"}[str(dtype)]


def autocast(device, dtype):
    """``torch.autocast`` for ``dtype`` on ``device`` (a null context for fp32)."""
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


__all__ = ["DEVICES", "PRECISIONS", "EngineError", "DeviceError", "pick_device", "cpu_has_bf16", "autocast_dtype",
           "precision_name", "autocast", "is_oom"]
