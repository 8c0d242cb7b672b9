"""ONNX Runtime as a runner behind the engine: the same network, the same windows, another CPU library.

The engine (``runners.Runner``) hands a window batch to either PyTorch or this runner; everything
else in the prediction path (preprocessing, windows, flips, resampling, ensemble, smoothing,
labels) is shared, and the run report's ``runtime`` says which one computed the network.

How a model gets here: the engine's eval-mode inference graph (BatchNorm folded) plus a softmax is
traced once per input shape ``(channels, height, width)`` with ``torch.onnx.export`` (the networks
resize their decoder features to sizes read from the input, so a trace holds one plane size; the
batch stays free) and stored in a user cache folder, keyed by the weights' SHA-256, the network
code and the torch version: the first run of a model on a plane size pays the export (seconds), later
runs and later processes load the file (milliseconds). Models held only in memory (a training
run's weights, no SHA-256) are exported into memory and not cached. The key is computed without
importing PyTorch (its installed version is read from the package metadata), so a process that
finds the graph in the cache never needs PyTorch at all (:mod:`host_runner`); the network itself
is then only loaded, through ``load``, when a graph has to be exported.

Sessions live in a small process-wide table, so a long-lived worker process (``worker.py``) keeps
them between volumes. ONNX Runtime runs float32 here (its CPU kernels pick the widest vector
instructions the CPU has); bf16/fp16 requests stay on PyTorch.

Optional dependency: ``pip install onnxruntime`` (the ``fast`` extra). Without it ``--runtime auto``
uses PyTorch and ``--runtime onnx`` is refused with that hint.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import threading
import warnings
from collections import OrderedDict
from pathlib import Path

from LumbarSegmentLib.inference.devices import EngineError

RUNTIMES = ("auto", "torch", "onnx", "openvino")
CACHE_ENV = "LUMBARSEG_CACHE"  # folder for derived files (ONNX graphs); default: the user cache folder
INSTALL_HINT = "pip install onnxruntime onnx (or the 'fast' extra of lumbarsegment)"
OPENVINO_HINT = "pip install openvino onnx (or the 'fast' extra of lumbarsegment)"
OPSET = 17


class ProcessCache:
    """Loaded runtimes kept for the life of the process, most recently used last, at most ``size`` of them:
    a warm worker reuses a session or compiled model between drafts instead of building it again."""

    def __init__(self, size: int):
        self.size, self.items, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, key, make):
        """The entry for ``key``, made by ``make()`` (outside the lock) when absent."""
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        made = make()
        with self.lock:
            self.items[key] = made
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return made

    def clear(self) -> None:
        with self.lock:
            self.items.clear()


_SESSIONS = ProcessCache(8)  # per process: (model, plane size, threads) combinations kept loaded


def onnxruntime_available() -> bool:
    """ONNX Runtime runs the network; PyTorch's exporter needs the onnx package to write it."""
    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))


def openvino_available() -> bool:
    """OpenVINO runs the network (openvino_runner); it reads the graph PyTorch's ONNX exporter writes."""
    return all(importlib.util.find_spec(m) is not None for m in ("openvino", "onnx"))


def cache_dir() -> Path:
    """Where exported graphs are kept: ``$LUMBARSEG_CACHE``, else ``$XDG_CACHE_HOME``/``~/.cache``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / "onnx"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lumbarsegment" / "onnx"


def choose_runtime(requested: str, device_type: str, dtype, sha256: str | None, bn_adapt: float) -> str:
    """``torch``, ``onnx`` or ``openvino`` for one model; ``auto`` keeps PyTorch here, the one runtime that
    runs every option (the command and the worker turn ``auto`` into OpenVINO first where no GPU is present:
    :mod:`inference.runtime_choice`).

    ``onnx`` and ``openvino`` are refused, with what to do instead, where they cannot run the request as asked.
    ``dtype`` is the requested reduced precision (a torch dtype or its name; None = float32): OpenVINO
    takes bf16 when asked for it explicitly (whether the CPU has it: ``openvino_runner.check_precision``),
    and ``"int8"`` (a quantised network) is OpenVINO's alone, so ``auto`` then means OpenVINO.
    """
    if requested not in RUNTIMES:
        raise EngineError(f"unknown runtime {requested!r}; choose one of {', '.join(RUNTIMES)}")
    if dtype == "int8":  # a quantised network: OpenVINO's alone (``auto`` means it), on the CPU
        if requested not in ("auto", "openvino"):
            raise EngineError(f"--precision int8 is computed by OpenVINO, not by runtime {requested!r}; use "
                              "--runtime openvino (or auto), or another --precision")
        if device_type != "cpu":
            raise EngineError(f"--precision int8 runs on the CPU, not on {device_type}; use --device cpu (or "
                              "auto), or another --precision on the GPU")
        if bn_adapt > 0:
            raise EngineError("--precision int8 runs a quantised copy of the weights as stored, so BatchNorm "
                              "adaptation (--bn-adapt) cannot change them; drop one of the two")
        requested, dtype = "openvino", None
    if requested in ("auto", "torch"):
        return "torch"
    if requested == "onnx" and not onnxruntime_available():
        raise EngineError(f"runtime 'onnx' needs ONNX Runtime, which is not installed: {INSTALL_HINT}; "
                          "or use --runtime torch")
    if requested == "openvino" and not openvino_available():
        raise EngineError(f"runtime 'openvino' needs OpenVINO, which is not installed: {OPENVINO_HINT}; "
                          "or use --runtime torch")
    if device_type != "cpu":
        raise EngineError(f"runtime {requested!r} runs on the CPU, not on {device_type}; use --device cpu or "
                          "--runtime torch")
    if dtype is not None and not (requested == "openvino" and "bfloat16" in str(dtype)):
        raise EngineError(f"runtime {requested!r} computes in float32"
                          + (" (or bf16 with --runtime openvino)" if requested == "onnx" else "")
                          + "; use --precision fp32 (or auto on a CPU without bf16) or --runtime torch")
    if bn_adapt > 0:
        raise EngineError(f"runtime {requested!r} runs the weights as stored; BatchNorm adaptation (--bn-adapt) "
                          "needs --runtime torch")
    return requested


def _torch_version() -> str:
    """The installed PyTorch's version, read from its package metadata: importing PyTorch to ask would
    cost a cold command more than a second."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        return "none"


def _code_tag() -> str:
    """Digest of the network code and the exporter: a change to either makes new cache entries.

    The files are found without importing them (``find_spec``): the network code imports PyTorch."""
    spec = importlib.util.find_spec("LumbarSegmentLib.models")
    rewrite = importlib.util.find_spec("LumbarSegmentLib.inference.graph_rewrite")
    h = hashlib.sha256(f"{_torch_version()}|opset{OPSET}|v2".encode())
    for folder in spec.submodule_search_locations:
        for f in sorted(Path(folder).glob("*.py")):
            h.update(f.read_bytes())
    h.update(Path(rewrite.origin).read_bytes())
    return h.hexdigest()[:16]


class OnnxModel:
    """One network as ONNX Runtime sessions, one per input shape; ``probabilities(x)`` = softmax(net(x)).

    ``module`` is the PyTorch inference graph to export, or None with ``load`` a function that returns it:
    then the network is only built (and PyTorch imported) when a graph is missing from the cache."""

    def __init__(self, module, sha256: str | None, threads: int | None = None, load=None):
        self.module, self.sha256, self.load = module, sha256, load
        self.threads = int(threads or 0)  # 0: ONNX Runtime's default (one thread per physical core)
        self.exported_s = 0.0  # seconds spent exporting in this run (0 when every graph came from the cache)
        self._tag = None
        self._own = {}  # sessions of a model without a SHA-256 (in memory): never shared by key

    @staticmethod
    def version() -> str:
        import onnxruntime

        return f"onnxruntime {onnxruntime.__version__}"

    def probabilities(self, x):
        """Softmax probabilities, float32 numpy ``[B, K, H, W]``, for windows ``x`` (numpy float32 [B, C, H, W])."""
        import numpy as np

        session = self._session(tuple(int(n) for n in x.shape[1:]))
        return session.run(None, {"windows": np.ascontiguousarray(x, dtype=np.float32)})[0]

    def _session(self, shape: tuple):
        if self.sha256 is None:
            if shape not in self._own:
                self._own[shape] = self._new_session(self._export(shape))
            return self._own[shape]
        return _SESSIONS.get((self.sha256, shape, self.threads), lambda: self._new_session(self._graph(shape)))

    def _graph(self, shape: tuple):
        """The serialised graph for ``shape``: from the cache when there, else exported (and cached)."""
        path = cache_dir() / f"{self.cache_name(shape)}.onnx"
        try:
            return path.read_bytes()
        except OSError:
            pass
        data = self._export(shape)
        try:  # a cache that cannot be written costs the export next time, nothing else
            from LumbarSegmentLib.core.files import atomic_path

            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                Path(tmp).write_bytes(data)
        except OSError:
            pass
        return data

    def cache_name(self, shape: tuple) -> str:
        """The cache key of ``shape``'s graph: weights, network code and exporter, plane size."""
        if self._tag is None:
            self._tag = _code_tag()
        return f"{self.sha256[:32]}-{self._tag}-{'x'.join(map(str, shape))}"

    def _export(self, shape: tuple) -> bytes:
        import io
        import time

        import torch

        t = time.perf_counter()
        if self.module is None:
            self.module = self.load()
        net = _with_softmax(self.module).eval()
        buf = io.BytesIO()
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer and deprecation notes: the checks below are ours
            torch.onnx.export(net, (torch.zeros((1, *shape)),), buf, input_names=["windows"],
                              output_names=["probabilities"], opset_version=OPSET, dynamo=False,
                              dynamic_axes={"windows": {0: "batch"}, "probabilities": {0: "batch"}})
        self.exported_s += time.perf_counter() - t
        return buf.getvalue()

    def _new_session(self, graph: bytes):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        # Threads that spin between operations are badly hurt on shared cores (docs/benchmarks.md).
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        so.enable_cpu_mem_arena = False  # the arena keeps the largest batch's memory for good (+0.4 GB here)
        return ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"])


def _with_softmax(module):
    from torch import nn

    class WithSoftmax(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x).float().softmax(dim=1)

    return WithSoftmax(module)


def clear_sessions() -> None:
    """Drop every loaded session (tests; a worker asked to release memory)."""
    _SESSIONS.clear()
