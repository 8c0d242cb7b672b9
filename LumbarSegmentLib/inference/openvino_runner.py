"""OpenVINO as a runner behind the engine, next to PyTorch and ONNX Runtime.

Same contract as :mod:`onnx_runner`: the engine hands a window batch over and gets softmax
probabilities back; preprocessing, windows, flips, resampling, ensembles, smoothing and labels stay
the engine's, and the run report's ``runtime`` names OpenVINO.

Why a third runtime: OpenVINO's CPU plugin fuses the U-Net's convolution + bias + activation chains
and plans its memory once per shape, which is where PyTorch's eager mode loses time on CPUs without
bf16 arithmetic (docs/benchmarks.md has the side-by-side figures).

How a model gets here: the ONNX graph that :mod:`onnx_runner` exports (and caches) per plane size is
converted once into OpenVINO's own format (``.xml`` + ``.bin``, weights kept in float32) and cached
next to it under the same key (weights SHA-256, network code, PyTorch version, plane size); a later
process reads that file and only compiles it, without PyTorch (:mod:`host_runner`). Compiled models
live in a small process-wide table, so the warm worker keeps them between drafts.

Precision: OpenVINO is told to compute in float32 (``INFERENCE_PRECISION_HINT``): left alone it would
pick bf16 on a CPU that has it, a lossy step this project only takes when asked. ``--precision bf16``
with ``--runtime openvino`` asks for it: the network then runs in bf16 (about twice as fast on a CPU
with AVX-512 BF16 or AMX; the labels move by a few hundred voxels, docs/benchmarks.md), only where
OpenVINO's CPU plugin says it has bf16 arithmetic; elsewhere the request is refused in one line.
``--precision int8`` runs a quantised copy of the graph (:mod:`int8`: calibrated once per plane size on
shipped training slices, cached beside the float32 one), on any CPU; the rest of the graph stays float32.

Optional dependency: ``pip install openvino onnx`` (the ``fast`` extra).
"""
from __future__ import annotations

import os
import threading
from functools import partial
from pathlib import Path

from LumbarSegmentLib.inference.devices import EngineError
from LumbarSegmentLib.inference.onnx_runner import OnnxModel, ProcessCache, cache_dir

_COMPILED = ProcessCache(8)  # per process: (model, plane size, threads, precision) combinations kept compiled
_CORE = None


def ir_dir() -> Path:
    """Converted models live beside the ONNX graphs they came from."""
    return cache_dir().parent / "openvino"


def _core():
    """One OpenVINO Core per process: creating it loads the plugins (tens of milliseconds)."""
    global _CORE
    if _CORE is None:
        import openvino as ov

        _CORE = ov.Core()
    return _CORE


# --precision -> OpenVINO's INFERENCE_PRECISION_HINT (int8: the quantised graph's remaining float steps in f32)
HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
BF16_REFUSED = ("bf16 with --runtime openvino needs a CPU with bf16 arithmetic (AVX-512 BF16 or AMX), which "
                "OpenVINO does not find here; use --precision fp32")


def compile_config(threads: int, precision: str = "fp32") -> dict:
    """CPU plugin settings: float32 unless bf16 is asked for, one stream tuned for latency, no pinning
    (shared desktop cores)."""
    return {"INFERENCE_PRECISION_HINT": HINTS[precision], "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1",
            "INFERENCE_NUM_THREADS": str(int(threads or 0)), "ENABLE_CPU_PINNING": "NO"}


# oneDNN ISA caps (``ONEDNN_MAX_CPU_ISA``) below the first with bf16 arithmetic: under these OpenVINO's CPU
# plugin (which carries oneDNN) has no bf16 kernels, though the CPU itself may report bf16
_ISA_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def cpu_has_bf16() -> bool:
    """Whether OpenVINO's CPU plugin computes bf16 natively here: its own capability list (asking
    PyTorch would import it, which the OpenVINO path avoids), unless oneDNN is capped below bf16."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in _ISA_WITHOUT_BF16:
        return False
    try:
        return "BF16" in _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except (RuntimeError, ImportError):
        return False


def check_precision(precision: str) -> str:
    """``fp32``, ``bf16`` or ``int8`` for OpenVINO; ``auto`` as for PyTorch on the CPU: bf16 where the CPU
    computes it natively (the report names it), else fp32. Refuses bf16 on a CPU without it and fp16
    always, with what to do instead. int8 runs on any x86 CPU (AVX2 or not), only when asked."""
    if precision == "auto":
        return "bf16" if cpu_has_bf16() else "fp32"
    if precision in ("fp32", "int8"):
        return precision
    if precision == "bf16":
        if not cpu_has_bf16():
            raise EngineError(BF16_REFUSED)
        return "bf16"
    raise EngineError(f"runtime 'openvino' computes in fp32, bf16 or int8, not {precision}; use --precision fp32")


class OpenVinoModel:
    """One network as compiled OpenVINO models, one per input shape; ``probabilities(x)`` = softmax(net(x))."""

    def __init__(self, module, sha256: str | None, threads: int | None = None, load=None, precision: str = "fp32",
                 calibration=None):
        self.calibration = calibration  # int8: ``calibration(shape)`` -> network inputs to measure ranges on
        self.threads = int(threads or 0)  # 0: OpenVINO's default (its own count of physical cores)
        self.precision = check_precision(precision)
        self.sha256 = sha256
        # the exporter (and the ONNX cache) this runner reads; ``module``/``load`` as there
        self.graphs = OnnxModel(module, sha256, threads, load)
        self._own = {}  # compiled models of a network without a SHA-256: never shared by key
        self._requests = {}  # one inference request per compiled model, reused batch after batch

    @property
    def exported_s(self) -> float:
        """Seconds spent exporting (ONNX) in this run: 0 when every graph came from a cache."""
        return self.graphs.exported_s

    @staticmethod
    def version() -> str:
        import openvino as ov

        return f"openvino {ov.__version__.split('-')[0]}"

    def probabilities(self, x):
        """Softmax probabilities, float32 numpy ``[B, K, H, W]``, for windows ``x`` (numpy float32 [B, C, H, W])."""
        import numpy as np

        shape = tuple(int(n) for n in x.shape[1:])
        request = self._requests.get(shape)
        if request is None:
            request = self._requests[shape] = self._compiled(shape).create_infer_request()
        request.infer({0: np.ascontiguousarray(x, dtype=np.float32)})
        return request.get_output_tensor(0).data.copy()  # the request's buffer is reused by the next batch

    def _compiled(self, shape: tuple):
        if self.sha256 is None:
            if shape not in self._own:
                model = self._convert(self.graphs._export(shape))
                self._own[shape] = self._compile(self._quantised(model, shape) if self.precision == "int8" else model)
            return self._own[shape]
        key = (self.sha256, shape, self.threads, self.precision)
        return _COMPILED.get(key, lambda: self._compile(self._model(shape)))

    def _model(self, shape: tuple):
        """OpenVINO's model for ``shape`` (int8: quantised, :mod:`int8`): read from the cache when there,
        else made (and cached)."""
        tag = self.graphs.cache_name(shape)
        fp32 = partial(self._cached, tag, lambda: self._convert(self.graphs._graph(shape)))
        if self.precision != "int8":
            return fp32()
        from LumbarSegmentLib.inference.int8 import calibration_tag

        return self._cached(f"{tag}-int8-{calibration_tag()}", lambda: self._quantised(fp32(), shape))

    def _quantised(self, model, shape: tuple):
        from LumbarSegmentLib.inference.int8 import quantise

        if self.calibration is None:
            raise EngineError("--precision int8 needs calibration windows for this model; use --precision fp32")
        return quantise(model, self.calibration(shape))

    @staticmethod
    def _cached(tag: str, make):
        """The model cached as ``tag`` (.xml + .bin) in :func:`ir_dir`, or ``make()`` written there."""
        xml = ir_dir() / f"{tag}.xml"
        if xml.is_file() and xml.with_suffix(".bin").is_file():
            try:
                return _core().read_model(str(xml))
            except RuntimeError:
                pass  # a damaged cache entry: make it again
        model = make()
        try:  # a cache that cannot be written costs the conversion next time, nothing else
            import openvino as ov

            xml.parent.mkdir(parents=True, exist_ok=True)
            tmp = xml.with_name(f".{xml.stem}.{threading.get_ident()}.xml")
            ov.save_model(model, str(tmp), compress_to_fp16=False)  # weights as they are: no fp16 rounding
            tmp.with_suffix(".bin").replace(xml.with_suffix(".bin"))
            tmp.replace(xml)
        except (OSError, RuntimeError):
            pass
        return model

    @staticmethod
    def _convert(graph: bytes):
        import io

        import openvino as ov

        return ov.convert_model(io.BytesIO(graph))

    def _compile(self, model):
        try:
            return _core().compile_model(model, "CPU", compile_config(self.threads, self.precision))
        except RuntimeError:
            # bf16 kernels missing although the CPU reports bf16 (e.g. oneDNN limited to AVX2 by
            # ONEDNN_MAX_CPU_ISA): OpenVINO's message is pages long, ours says what to do
            if self.precision == "bf16":
                raise EngineError(BF16_REFUSED) from None
            raise


def clear_compiled() -> None:
    """Drop every compiled model (tests; a worker asked to release memory)."""
    _COMPILED.clear()
