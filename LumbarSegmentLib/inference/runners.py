"""The models of a prediction, loaded and ready to run: :class:`LoadedModel` (a network plus what the
prediction must know about it) and :class:`Runner` (one model on one device, with the batching and
out-of-memory policy and the PyTorch or ONNX Runtime network).

Before the first batch each model (with ``bn_adapt`` > 0 its BatchNorm statistics first re-estimated
on the volume's own slices: :mod:`bn_adapt`) is turned into an equivalent, cheaper inference graph
(:func:`graph_rewrite.inference_graph`). On CUDA an out-of-memory error halves the batch and, at
batch 1, moves the run to the CPU (reported in ``warnings``).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

from LumbarSegmentLib.core.schema import LabelSchema, SchemaError
from LumbarSegmentLib.inference.devices import EngineError, autocast, autocast_dtype, is_oom
from LumbarSegmentLib.inference.graph_rewrite import inference_graph
from LumbarSegmentLib.inference.int8 import calibration_windows
from LumbarSegmentLib.inference.onnx_runner import OnnxModel, choose_runtime
from LumbarSegmentLib.inference.options import SegmentOptions
from LumbarSegmentLib.inference.slice_smoothing import neighbour_stack
from LumbarSegmentLib.inference.windows import tiling, window_grid
from LumbarSegmentLib.registry.package import ModelPackage, PackageError

# Windows per CPU forward pass: as many as hold this many pixels (4 whole 320 x 320 slices, 2 of 384 x 384):
# the activations of one batch are most of the run's memory, and fewer, larger batches were not faster.
CPU_BATCH_PIXELS = 4 * 320 * 320


class Cancelled(Exception):
    """The user cancelled the run; nothing was produced."""


@dataclass
class LoadedModel:
    """A network ready to run plus what the engine must know about it.

    This is how training validation, ``lumbarseg-train evaluate`` and the publish gate hand a
    model that lives in memory (a training run's current weights) to the same prediction path
    users get from a package on disk: same windows, precision, class-id channel mapping and
    label values. The engine never changes ``module``: it runs an eval-mode copy.
    """

    module: object  # torch.nn.Module
    schema: LabelSchema
    spacing: tuple
    patch_size: tuple
    normalisation: str = "zscore_nonzero"
    channels: int = 1
    slice_context: int = 0  # 2.5D: neighbour slices fed on each side (channels = 2 k + 1)
    ref: str = "in-memory model"
    sha256: str | None = None
    variant: str | None = None
    path: str | None = None
    owned: bool = False  # True: the engine may rewrite ``module`` in place (nobody else holds it)
    guidance: object = None  # core.guidance.GuidanceSpec of a click-guided model (its click maps follow the image)
    package: object = None  # the ModelPackage of a model read lazily: ``module`` stays None until it is needed
    # cache key of its converted graph (weights + architecture: :func:`graph_key`); None: a network held in
    # memory, exported for this run only and never cached
    graph_key: str | None = None

    @property
    def image_channels(self) -> int:
        """Input channels that carry the image (the rest are click maps, empty when drafting)."""
        return self.channels - (self.guidance.channels if self.guidance is not None else 0)

    @classmethod
    def from_package(cls, package: ModelPackage, lazy: bool = False) -> "LoadedModel":
        """Load a package's weights (verified against its sha256) on the CPU.

        ``lazy``: verify the package (weights' sha256, manifest integrity) but build no network: a runtime
        that finds the model's converted graph in its cache never needs PyTorch (:mod:`host_runner`)."""
        from LumbarSegmentLib.core.guidance import GuidanceSpec

        inp = package.manifest["input"]
        guidance = GuidanceSpec.from_dict(inp["guidance"], package.schema.ids) if "guidance" in inp else None
        if lazy:
            package.verify()
        return cls(module=None if lazy else package.load_model("cpu"), schema=package.schema,
                   spacing=tuple(package.spacing),
                   patch_size=tuple(package.patch_size),
                   normalisation=inp.get("normalisation", {}).get("method", "zscore_nonzero"),
                   channels=int(inp.get("channels", 1)), slice_context=int(inp.get("slice_context", 0)),
                   ref=package.ref, sha256=package.sha256,
                   variant=package.manifest["architecture"].get("variant"), path=str(package.path), owned=True,
                   guidance=guidance, package=package if lazy else None,
                   graph_key=graph_key(package.sha256, package.manifest["architecture"]))

    @classmethod
    def from_module(cls, module, schema: LabelSchema, spacing, patch_size, *, ref: str = "in-memory model",
                    variant: str | None = None, guidance=None) -> "LoadedModel":
        """Wrap a network held by someone else (e.g. a training loop); the engine runs a copy."""
        sp = tuple(float(x) for x in (spacing if len(spacing) == 2 else tuple(spacing) * 2))
        ps = tuple(int(x) for x in (patch_size if isinstance(patch_size, (tuple, list)) else (patch_size,) * 2))
        c = int(getattr(module, "in_channels", 1))
        k = (c - (guidance.channels if guidance is not None else 0) - 1) // 2
        return cls(module=module, schema=schema, spacing=sp, patch_size=ps, channels=c, slice_context=k,
                   ref=ref, variant=variant, owned=False, guidance=guidance)

    def snapshot(self) -> "LoadedModel":
        """An eval-mode copy the engine may own: one copy for many volumes (a validation pass over
        several cases) instead of the copy each ``segment_volume`` call makes of a borrowed module."""
        import copy
        from dataclasses import replace

        return replace(self, module=copy.deepcopy(self.module).to("cpu").eval(), owned=True)


def as_loaded(model, lazy: bool = False) -> LoadedModel:
    return model if isinstance(model, LoadedModel) else LoadedModel.from_package(model, lazy)


def _check_ensemble(packages: Sequence[LoadedModel]) -> LabelSchema:
    schema = packages[0].schema
    for p in packages[1:]:
        if set(p.schema.ids) != set(schema.ids):
            raise SchemaError(
                f"models in an ensemble must label the same structures: {packages[0].ref} has {schema.ids}, "
                f"{p.ref} has {p.schema.ids}"
            )
    return schema


def check_models(packages, options: SegmentOptions, lazy: bool = False) -> tuple[list[LoadedModel], LabelSchema]:
    """Validate the options and the models for the mode; returns the loaded models and the output schema
    (``lazy``: packages verified, their networks not built: :meth:`LoadedModel.from_package`)."""
    options.validate()
    packages = [as_loaded(p, lazy) for p in packages]
    if not packages:
        raise EngineError("no model given")
    if options.mode in ("fast", "tta") and len(packages) > 1:
        raise EngineError(f"mode {options.mode!r} uses one model, got {len(packages)}; use mode 'ensemble'")
    if options.mode == "ensemble" and len(packages) < 2:
        raise EngineError("mode 'ensemble' needs at least two models")
    for p in packages:
        if p.image_channels != 2 * p.slice_context + 1:
            raise PackageError(f"{p.ref} expects {p.channels} input channels, which is not a slice and "
                               f"{p.slice_context} neighbour(s) on each side; re-export or re-publish the model")
    return packages, _check_ensemble(packages)


def cpu_batch(slices, spec: LoadedModel, options: SegmentOptions) -> int:
    """Windows per CPU forward pass for slices [S, H, W]: :data:`CPU_BATCH_PIXELS` worth of windows."""
    (th, tw), _, _ = window_grid(tuple(slices.shape[-2:]), spec.patch_size, options)
    return max(1, CPU_BATCH_PIXELS // (th * tw))


def graph_key(weights_sha256: str, architecture) -> str:
    """The cache key of a package's converted network (ONNX, OpenVINO): its weights' SHA-256 *and* its
    recorded architecture.

    Exporting builds the network through the architecture checks (:mod:`models.checked`). A package whose
    architecture was edited and re-sealed around the same weights must not find the original's graph in
    the cache and so run without those checks: another architecture is another key, exported (and
    checked) anew."""
    import hashlib
    import json

    arch = json.dumps(architecture, sort_keys=True, default=str)
    return hashlib.sha256(f"{weights_sha256}|{arch}".encode()).hexdigest()


def external_model(runtime: str, module, sha256: str | None, threads: int | None, load=None, precision="fp32",
                   calibration=None):
    """The network on another library than PyTorch (``probabilities(numpy) -> numpy``), or None for PyTorch;
    ``module`` None: ``load()`` builds it when a graph must be exported (:class:`onnx_runner.OnnxModel`).
    ``precision`` (``fp32``/``bf16``/``int8``) and ``calibration`` (int8: ``shape`` -> network inputs,
    :func:`int8.calibration_windows`) matter to OpenVINO only: ONNX Runtime is only ever handed fp32."""
    if runtime == "onnx":
        return OnnxModel(module, sha256, threads, load)
    if runtime == "openvino":
        from LumbarSegmentLib.inference.openvino_runner import OpenVinoModel

        return OpenVinoModel(module, sha256, threads, load, precision, calibration)
    return None


class Runner:
    """One model on one device, with the batching / OOM policy; ``onnx``: the network when another library
    (ONNX Runtime or OpenVINO) computes it, None when PyTorch does."""

    uses_torch = True  # (the run report's torch version; :class:`host_runner.HostRunner` has none)

    def __init__(self, spec: LoadedModel, device, options: SegmentOptions, warnings: list, slices,
                 cancelled: Callable[[], bool]):
        import copy

        import torch

        self.spec, self.options, self.warnings, self.device = spec, options, warnings, device
        self.torch, self.cancelled = torch, cancelled  # ``slices``: the volume's model-space stack [S, H, W]
        self.batch = options.batch_size or (32 if device.type == "cuda" else cpu_batch(slices, spec, options))
        self.group = self.batch  # windows per progress step; fixed, while ``batch`` may shrink on OOM
        adapt = options.bn_adapt > 0
        # BN adaptation changes the statistics: always on a private copy, never on a shared module
        module = spec.module if spec.owned and not adapt else copy.deepcopy(spec.module).to("cpu")
        self.model = module.eval() if adapt else inference_graph(module.eval())
        self._place(device)
        # the runtime is chosen (or refused) before any BatchNorm adaptation pass: a refusal costs no work
        precision = "int8" if options.precision == "int8" else "bf16" if self.dtype is not None else "fp32"
        self.runtime = choose_runtime(options.runtime, self.device.type, "int8" if precision == "int8" else self.dtype,
                                      spec.graph_key, options.bn_adapt)
        if adapt:
            self._adapt(slices)
            self.model = inference_graph(self.model)
            self._place(device)
        self.onnx = external_model(self.runtime, self.model, spec.graph_key, options.threads, precision=precision,
                                   calibration=partial(calibration_windows, spec))

    def _adapt(self, slices):
        """Test-time BatchNorm adaptation (bn_adapt.py) on windows of the volume's own slices, cut
        as the prediction cuts them, shuffled into batches that each mix the whole stack."""
        import torch

        from LumbarSegmentLib.inference.bn_adapt import adapt_batchnorm, adapt_slices, mixed_batches

        stack = torch.cat([neighbour_stack(slices, i, i + 1, self.spec.slice_context)
                           for i in adapt_slices(slices.shape[0])])
        x, (th, tw), ys, xs = tiling(stack, self.spec.patch_size, self.options)
        windows = torch.stack([x[s, :, y:y + th, x0:x0 + tw] for s in range(x.shape[0]) for y in ys for x0 in xs])

        def place(part):  # a cancel is honoured between the batches
            if self.cancelled():
                raise Cancelled("segmentation cancelled")
            return self._to_device(part)

        with autocast(self.device, self.dtype):
            adapted = adapt_batchnorm(self.model, mixed_batches(windows, self.batch, place), self.options.bn_adapt)
        if not adapted:
            self.warnings.append(f"{self.spec.ref} has no BatchNorm statistics to adapt: ran as trained")

    def _place(self, device):
        import torch

        self.device = device
        self.model = self.model.to(device)
        onnx_auto = self.options.runtime in ("onnx", "openvino") and self.options.precision == "auto" and device.type == "cpu"
        self.dtype = autocast_dtype(device, "fp32" if onnx_auto else self.options.precision)
        if device.type in ("cuda", "cpu"):
            self.model = self.model.to(memory_format=torch.channels_last)

    def forward(self, x):
        """Softmax probabilities [B, K, H, W] (float32, on CPU) for windows ``x`` [B, 1, H, W]."""
        torch = self.torch
        outs, i = [], 0
        while i < x.shape[0]:
            chunk = x[i:i + self.batch]
            try:
                outs.append(self._run(chunk))
                i += chunk.shape[0]
            except RuntimeError as exc:
                if self.device.type != "cuda" or not is_oom(exc):
                    raise
                torch.cuda.empty_cache()
                if self.batch > 1:
                    self.batch = max(1, self.batch // 2)
                    self.warnings.append(f"CUDA out of memory: batch size reduced to {self.batch}")
                else:
                    self.warnings.append("CUDA out of memory even at batch size 1: continuing on the CPU")
                    self._place(torch.device("cpu"))
        return torch.cat(outs)

    def _to_device(self, x):
        """Input windows on the model's device, in the memory layout the model runs in."""
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=self.torch.channels_last) if self.device.type in ("cuda", "cpu") else x

    def _run(self, x):
        torch = self.torch
        if x.shape[1] < self.spec.channels:  # a click-guided model drafting: its click maps are empty
            x = torch.cat([x, x.new_zeros((x.shape[0], self.spec.channels - x.shape[1]) + tuple(x.shape[2:]))], 1)
        if self.onnx is not None:
            return torch.from_numpy(self.onnx.probabilities(x.contiguous().numpy()))
        with torch.inference_mode(), autocast(self.device, self.dtype):
            logits = self.model(self._to_device(x))
            return torch.softmax(logits.float(), dim=1).cpu()
