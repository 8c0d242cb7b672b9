"""The prediction without PyTorch: a model package computed by OpenVINO or ONNX Runtime, NumPy around it.

Why: importing PyTorch costs a cold ``lumbarseg segment`` on a CPU over a second and about 400 MB
(docs/benchmarks.md), more than OpenVINO needs to segment a clinical stack. When a request is one
these runtimes serve as asked (on the CPU, in float32, the weights as stored), the engine runs its
usual steps on NumPy arrays (:mod:`arrays`) and the network comes from the graph converted once per
weights and plane size and cached on disk (:mod:`onnx_runner`, :mod:`openvino_runner`). PyTorch is
imported only when that cache lacks the graph: to build the network and export it, once.

Everything else (CUDA, bf16, BatchNorm adaptation, a model held in memory) runs through PyTorch as
before (:class:`runners.Runner`).
"""
from __future__ import annotations

from functools import partial

from LumbarSegmentLib.inference.arrays import NUMPY
from LumbarSegmentLib.inference.int8 import calibration_windows
from LumbarSegmentLib.inference.onnx_runner import choose_runtime
from LumbarSegmentLib.inference.options import SegmentOptions
from LumbarSegmentLib.inference.runners import LoadedModel, cpu_batch, external_model
from LumbarSegmentLib.registry.package import ModelPackage

HOST_RUNTIMES = ("onnx", "openvino")  # the runtimes that compute a network without PyTorch


def requested_runtime(options: SegmentOptions) -> str:
    """The runtime asked for: ``--precision int8`` makes ``auto`` OpenVINO (the one runtime with a quantised
    network); otherwise ``--runtime`` as given."""
    return "openvino" if options.precision == "int8" and options.runtime == "auto" else options.runtime


def runs_without_torch(packages, options: SegmentOptions) -> bool:
    """Whether this request is served without PyTorch: an external runtime on the CPU in float32 (or
    OpenVINO in bf16, asked for explicitly), no BatchNorm adaptation, models given as packages (a model
    held in memory is a PyTorch network)."""
    runtime = requested_runtime(options)
    precision_ok = options.precision in ("auto", "fp32") or (runtime == "openvino"
                                                              and options.precision in ("bf16", "int8"))
    return (runtime in HOST_RUNTIMES and options.device in ("auto", "cpu") and precision_ok
            and not options.bn_adapt and all(isinstance(p, ModelPackage) for p in packages))


def host_precision(options: SegmentOptions) -> str:
    """``fp32``, ``bf16`` or ``int8``: what the external runtime computes in. OpenVINO reads ``auto`` as the
    engine does everywhere on the CPU (bf16 where the CPU has bf16 arithmetic, else fp32:
    ``openvino_runner.check_precision``); ONNX Runtime computes float32 only (:func:`runs_without_torch`)."""
    if requested_runtime(options) != "openvino":
        return "fp32"
    from LumbarSegmentLib.inference.openvino_runner import check_precision

    return check_precision(options.precision)


def device_name(options: SegmentOptions) -> str:
    """The device a PyTorch-side run asks for: ONNX Runtime and OpenVINO compute on the CPU, so for them
    ``auto`` is the CPU (not a GPU they would refuse)."""
    return "cpu" if options.device == "auto" and requested_runtime(options) in HOST_RUNTIMES else options.device


class HostDevice:
    """The CPU where no PyTorch device is at hand; it reads like ``torch.device("cpu")`` to the engine."""

    type, index = "cpu", None

    def __str__(self) -> str:
        return "cpu"


CPU = HostDevice()


def _network(package: ModelPackage):
    """The package's network as :class:`runners.Runner` prepares it for export (inference graph, CPU,
    channels-last); only called when a graph must be exported, so only then is PyTorch imported."""
    import torch

    from LumbarSegmentLib.inference.graph_rewrite import inference_graph

    return inference_graph(package.load_model("cpu").eval()).to(memory_format=torch.channels_last)


class HostRunner:
    """One model computed by OpenVINO or ONNX Runtime on NumPy windows: the part of
    :class:`runners.Runner` that the engine uses, without PyTorch."""

    uses_torch = False

    def __init__(self, spec: LoadedModel, options: SegmentOptions, slices):
        self.spec, self.options = spec, options
        precision = host_precision(options)
        self.device = CPU
        self.dtype = {"bf16": "bfloat16", "int8": "int8"}.get(precision)  # the report's name for the precision
        self.batch = self.group = options.batch_size or cpu_batch(slices, spec, options)
        self.runtime = choose_runtime(options.runtime, "cpu", self.dtype, spec.graph_key, options.bn_adapt)
        self.onnx = external_model(self.runtime, None, spec.graph_key, options.threads,
                                   load=partial(_network, spec.package), precision=precision,
                                   calibration=partial(calibration_windows, spec))

    def forward(self, x):
        """Softmax probabilities [B, K, H, W] (float32 NumPy) for windows ``x`` [B, C, H, W] (NumPy)."""
        if x.shape[1] < self.spec.channels:  # a click-guided model drafting: its click maps are empty
            x = NUMPY.cat_channels(x, self.spec.channels - x.shape[1])
        return self.onnx.probabilities(x)
