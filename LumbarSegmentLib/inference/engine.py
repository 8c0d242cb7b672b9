"""The inference engine: a Volume and model package(s) in, a label map on the exact input grid out.

Knows nothing of Slicer. The steps, per chunk of sagittal slices (memory stays
bounded whatever the volume size):

1. ``preprocess.model_slices``: canonical slices, normalised, at each model's spacing;
2. sliding window (the model's patch size, Gaussian-weighted blending where windows
   overlap), windows of several slices batched together; optional flip TTA; a 2.5D model
   (``slice_context`` k) reads each slice between its k neighbours on either side;
3. softmax probabilities, resampled (bilinear) back to the input's in-plane grid and
   averaged over models (ensemble), channels matched **by class id**;
4. a Gaussian average of the probabilities across neighbouring slices (``slice_smoothing_mm``,
   in millimetres, so thin slices are averaged over more neighbours than thick ones;
   :class:`slice_smoothing.SliceSmoother`): the network sees one slice at a time, and its neighbours' opinions
   mend slices where it wavers (+0.009 level-range Dice on validation, docs/validation.md);
5. argmax → schema values, optional confidence (max probability), back to the
   stored array order with ``layout.from_canonical``.

Before the first batch each loaded model (with ``bn_adapt`` > 0, off by default, its BatchNorm
statistics first re-estimated on the volume's own slices: :mod:`bn_adapt`) is turned into an
equivalent, cheaper inference graph (:func:`inference_graph`): BatchNorm folded into the preceding
convolution and PReLU evaluated as ``max(x, a*x)`` (docs/benchmarks.md says what that buys on a CPU).

Runtimes (``runtime``): PyTorch computes the network, or ONNX Runtime on the CPU in float32
(:mod:`onnx_runner`: the same inference graph exported, cached per weights and plane size); only
the network changes hands, every other step above is this module's. The report names the runtime.

Devices: ``auto`` picks CUDA, then MPS, then CPU. On CUDA the model runs in
channels_last with fp16/bf16 autocast; a CUDA out-of-memory error halves the
batch and, at batch 1, moves the run to the CPU (reported in ``warnings``).
``progress(done, total)`` is called after every batch and ``cancel()`` checked
before each; cancelling raises :class:`Cancelled` and the engine writes nothing
(it never writes files at all: the caller does, after success).
"""
from __future__ import annotations

import math
import os
import platform
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from LumbarSegmentLib.inference.devices import (DEVICES, PRECISIONS, EngineError, autocast, autocast_dtype, cpu_has_bf16,  # noqa: F401
                      is_oom, pick_device)
from LumbarSegmentLib.core.geometry import resize_planes
from LumbarSegmentLib.inference.graph_rewrite import inference_graph  # noqa: F401  (part of the engine's API)
from LumbarSegmentLib.inference.onnx_runner import OnnxModel, choose_runtime
from LumbarSegmentLib.inference.options import MODES, SegmentOptions  # noqa: F401  (part of the engine's API)
from LumbarSegmentLib.registry.package import ModelPackage, PackageError
from LumbarSegmentLib.inference.preprocess import model_slices
from LumbarSegmentLib.core.schema import LabelSchema, SchemaError
from LumbarSegmentLib.inference.slice_smoothing import SliceSmoother, neighbour_stack
from LumbarSegmentLib.core.volume import Volume

# OpenMP threads that busy-wait between operations (libgomp's default) are badly hurt when other
# processes share the cores (a clinical VM, a CI runner, a training job next door): each
# operation then waits for a preempted sibling thread. Sleeping instead cost nothing measurable
# here and made a 15-slice CPU run 2.6x faster on 2 busy cores (docs/benchmarks.md). libgomp
# reads the policy once, when torch is first imported, so it can only be chosen here when this
# module is imported before torch (the CLI does so); a policy set by the user is kept.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Windows per CPU forward pass: as many as hold this many pixels (4 whole 320 x 320 slices, 2 of 384 x 384):
# the activations of one batch are most of the run's memory, and fewer, larger batches were not faster.
CPU_BATCH_PIXELS = 4 * 320 * 320


class Cancelled(Exception):
    """The user cancelled the run; nothing was produced."""


@dataclass
class SegmentationResult:
    labels: Volume  # uint8, values of ``schema``, on the input grid
    schema: LabelSchema
    confidence: Volume | None
    report: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- windows
def window_starts(length: int, window: int, overlap: float) -> list[int]:
    """Start offsets of windows of ``window`` px covering ``length`` px (length >= window)."""
    if length <= window:
        return [0]
    step = max(1, int(window * (1 - overlap)))
    n = math.ceil((length - window) / step) + 1
    return [int(round(i * (length - window) / (n - 1))) for i in range(n)]


def gaussian_weight(h: int, w: int, sigma_frac: float = 0.125):
    import torch

    def g(n):
        x = torch.arange(n, dtype=torch.float32) - (n - 1) / 2
        return torch.exp(-0.5 * (x / max(1.0, n * sigma_frac)) ** 2)

    wmap = g(h)[:, None] * g(w)[None, :]
    return (wmap / wmap.max()).clamp_min(1e-3)


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

    @classmethod
    def from_package(cls, package: ModelPackage) -> "LoadedModel":
        """Load a package's weights (verified against its sha256) on the CPU."""
        inp = package.manifest["input"]
        return cls(module=package.load_model("cpu"), schema=package.schema, spacing=tuple(package.spacing),
                   patch_size=tuple(package.patch_size),
                   normalisation=inp.get("normalisation", {}).get("method", "zscore_nonzero"),
                   channels=int(inp.get("channels", 1)), slice_context=int(inp.get("slice_context", 0)),
                   ref=package.ref, sha256=package.sha256,
                   variant=package.manifest["architecture"].get("variant"), path=str(package.path), owned=True)

    @classmethod
    def from_module(cls, module, schema: LabelSchema, spacing, patch_size, *, ref: str = "in-memory model",
                    variant: str | None = None) -> "LoadedModel":
        """Wrap a network held by someone else (e.g. a training loop); the engine runs a copy."""
        sp = tuple(float(x) for x in (spacing if len(spacing) == 2 else tuple(spacing) * 2))
        ps = tuple(int(x) for x in (patch_size if isinstance(patch_size, (tuple, list)) else (patch_size,) * 2))
        c = int(getattr(module, "in_channels", 1))
        return cls(module=module, schema=schema, spacing=sp, patch_size=ps, channels=c, slice_context=(c - 1) // 2,
                   ref=ref, variant=variant, owned=False)

    def snapshot(self) -> "LoadedModel":
        """An eval-mode copy the engine may own: one copy for many volumes (a validation pass over
        several cases) instead of the copy each ``segment_volume`` call makes of a borrowed module."""
        import copy
        from dataclasses import replace

        return replace(self, module=copy.deepcopy(self.module).to("cpu").eval(), owned=True)


def as_loaded(model) -> LoadedModel:
    return model if isinstance(model, LoadedModel) else LoadedModel.from_package(model)


class _Runner:
    """One model on one device, with the batching / OOM policy."""

    def __init__(self, spec: LoadedModel, device, options: SegmentOptions, warnings: list, slices,
                 cancelled: Callable[[], bool]):
        import copy

        import torch

        self.spec, self.options, self.warnings, self.device = spec, options, warnings, device
        self.torch, self.cancelled = torch, cancelled  # ``slices``: the volume's model-space stack [S, H, W]
        self.batch = options.batch_size or (32 if device.type == "cuda" else _cpu_batch(slices, spec, options))
        self.group = self.batch  # windows per progress step; fixed, while ``batch`` may shrink on OOM
        adapt = options.bn_adapt > 0
        # BN adaptation changes the statistics: always on a private copy, never on a shared module
        module = spec.module if spec.owned and not adapt else copy.deepcopy(spec.module).to("cpu")
        self.model = module.eval() if adapt else inference_graph(module.eval())
        self._place(device)
        if adapt:
            self._adapt(slices)
            self.model = inference_graph(self.model)
            self._place(device)
        self.runtime = choose_runtime(options.runtime, self.device.type, self.dtype, spec.sha256, options.bn_adapt)
        self.onnx = OnnxModel(self.model, spec.sha256, options.threads) if self.runtime == "onnx" else None

    def _adapt(self, slices):
        """Test-time BatchNorm adaptation (bn_adapt.py) on windows of the volume's own slices, cut
        as the prediction cuts them, shuffled into batches that each mix the whole stack."""
        import torch

        from LumbarSegmentLib.inference.bn_adapt import adapt_batchnorm, adapt_slices, mixed_batches

        stack = torch.cat([neighbour_stack(slices, i, i + 1, self.spec.slice_context)
                           for i in adapt_slices(slices.shape[0])])
        x, (th, tw), ys, xs = _tiling(stack, self.spec, self.options)
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
        onnx_auto = self.options.runtime == "onnx" and self.options.precision == "auto" and device.type == "cpu"
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
        if self.onnx is not None:
            return torch.from_numpy(self.onnx.probabilities(x.contiguous().numpy()))
        with torch.inference_mode(), autocast(self.device, self.dtype):
            logits = self.model(self._to_device(x))
            return torch.softmax(logits.float(), dim=1).cpu()


def _cpu_batch(slices, spec: LoadedModel, options: SegmentOptions) -> int:
    (th, tw), _, _ = _window_grid(tuple(slices.shape[-2:]), spec, options)
    return max(1, CPU_BATCH_PIXELS // (th * tw))


def _window_grid(plane: tuple[int, int], spec: LoadedModel, options: SegmentOptions):
    """The prediction's windows over a slice of ``plane`` (H, W) (padded up to one tile when smaller):
    ``((tile h, tile w), starts along H, starts along W)``."""
    tile = options.tile
    if tile == "auto":
        tile = "whole" if max(plane) <= 2 * max(spec.patch_size) else "patch"
    if tile == "patch":
        th, tw = spec.patch_size
    elif tile == "whole":
        th, tw = (max(32, -(-n // 32) * 32) for n in plane)
    else:
        th = tw = int(tile)
    return ((th, tw), window_starts(max(plane[0], th), th, options.overlap),
            window_starts(max(plane[1], tw), tw, options.overlap))


def _tiling(stack, spec: LoadedModel, options: SegmentOptions):
    """``stack [n, C, H, W]`` zero-padded up to at least one tile, and its :func:`_window_grid`."""
    import torch.nn.functional as F

    (th, tw), ys, xs = _window_grid(tuple(stack.shape[2:]), spec, options)
    pad_h, pad_w = max(0, th - stack.shape[2]), max(0, tw - stack.shape[3])
    return (F.pad(stack, (0, pad_w, 0, pad_h)) if pad_h or pad_w else stack), (th, tw), ys, xs


def _predict_chunk(runner: _Runner, stack, flips: Sequence[bool], options: SegmentOptions,
                   tick: Callable[[], None]):
    """Probabilities [n, K, H, W] for a chunk of model-space slices [n, C, H, W] (C = 2k+1 input slices)."""
    import torch

    n, _, H, W = stack.shape
    x, (th, tw), ys, xs = _tiling(stack, runner.spec, options)
    ph, pw = x.shape[2:]
    single = len(ys) == 1 and len(xs) == 1
    weight = torch.ones(th, tw) if single else gaussian_weight(th, tw)
    K = runner.spec.schema.num_classes
    acc = torch.zeros(n, K, ph, pw)
    wsum = torch.zeros(ph, pw)
    for y in ys:
        for x0 in xs:
            wsum[y:y + th, x0:x0 + tw] += weight
    windows = [(s, y, x0) for s in range(n) for y in ys for x0 in xs]
    bs = runner.group
    for b in range(0, len(windows), bs):
        group = windows[b:b + bs]
        batch = torch.stack([x[s, :, y:y + th, x0:x0 + tw] for s, y, x0 in group])
        probs = 0
        for flip in flips:
            inp = torch.flip(batch, dims=[3]) if flip else batch
            out = runner.forward(inp)
            probs = probs + (torch.flip(out, dims=[3]) if flip else out)
            tick()
        probs = probs / len(flips)
        for (s, y, x0), p in zip(group, probs):
            if single:  # weight and wsum are all ones: p * 1 / 1 == p
                acc[s] = p
            else:
                acc[s, :, y:y + th, x0:x0 + tw] += p * weight
    if not single:
        acc /= wsum
    return acc[:, :, :H, :W]


def _count_batches(n_slices, plane, runner, flips, options):
    _, ys, xs = _window_grid(plane, runner.spec, options)
    per_slice = len(ys) * len(xs)
    bs = runner.group
    total = 0
    for c0 in range(0, n_slices, options.chunk_slices):
        n = min(options.chunk_slices, n_slices - c0)
        total += math.ceil(n * per_slice / bs) * len(flips)
    return total


def _check_ensemble(packages: Sequence[LoadedModel]) -> LabelSchema:
    schema = packages[0].schema
    for p in packages[1:]:
        if set(p.schema.ids) != set(schema.ids):
            raise SchemaError(
                f"models in an ensemble must label the same structures: {packages[0].ref} has {schema.ids}, "
                f"{p.ref} has {p.schema.ids}"
            )
    return schema


def _check_models(packages, options: SegmentOptions) -> tuple[list[LoadedModel], LabelSchema]:
    """Validate the options and the models for the mode; returns the loaded models and the output schema."""
    options.validate()
    packages = [as_loaded(p) for p in packages]
    if not packages:
        raise EngineError("no model given")
    if options.mode in ("fast", "tta") and len(packages) > 1:
        raise EngineError(f"mode {options.mode!r} uses one model, got {len(packages)}; use mode 'ensemble'")
    if options.mode == "ensemble" and len(packages) < 2:
        raise EngineError("mode 'ensemble' needs at least two models")
    for p in packages:
        if p.channels != 2 * p.slice_context + 1:
            raise PackageError(f"{p.ref} expects {p.channels} input channels, which is not a slice and "
                               f"{p.slice_context} neighbour(s) on each side; re-export or re-publish the model")
    return packages, _check_ensemble(packages)


def _report(volume, schema, runners, options, layout, info, n_slices, counts, entropy_sum, fg_voxels, timings,
            warnings) -> dict:
    """The run report: what ran where, on what input, what came out (voxels, uncertainty), how long."""
    import torch

    r0 = runners[0]
    return {
        "labels": {str(c.value): c.id for c in schema.classes},
        "schema": schema.name,
        "models": [{"ref": r.spec.ref, "variant": r.spec.variant, "runtime": r.runtime,
                    "sha256": r.spec.sha256, "path": r.spec.path} for r in runners],
        "runtime": OnnxModel.version() if r0.onnx is not None else f"torch {torch.__version__}",
        "mode": options.mode,
        "slice_smoothing_mm": options.slice_smoothing_mm,
        "bn_adapt": options.bn_adapt,
        "device": str(r0.device),
        "precision": str(r0.dtype).replace("torch.", "") if r0.dtype else "float32",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if r0.device.type == "cuda" else None,
        "python": platform.python_version(),
        "input": {**volume.geometry_dict(), "layout": layout.to_dict(), "normalisation": {
            k: v for k, v in info.items() if k not in ("layout",)}},
        "slices": n_slices,
        "voxels_per_class": {c.id: int(counts[c.value]) for c in schema.classes},
        "uncertainty": {"mean_entropy_foreground": entropy_sum / fg_voxels if fg_voxels else 0.0,
                        "foreground_voxels": fg_voxels},
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
        "warnings": warnings,
    }


def segment_volume(volume: Volume, packages: Sequence[ModelPackage | LoadedModel],
                   options: SegmentOptions | None = None,
                   progress: Callable[[int, int], None] | None = None,
                   cancel: Callable[[], bool] | threading.Event | None = None) -> SegmentationResult:
    """Segment ``volume`` with one model (fast/tta) or several (ensemble); see the module doc.

    ``packages`` are model packages (loaded here) or :class:`LoadedModel` s (already in memory).
    """
    import torch

    options = options or SegmentOptions()
    packages, schema = _check_models(packages, options)
    is_cancelled = (cancel.is_set if isinstance(cancel, threading.Event) else cancel) or (lambda: False)
    if options.threads:
        torch.set_num_threads(int(options.threads))

    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    warnings: list[str] = []
    device = pick_device(options.device)
    flips = (False, True) if options.mode in ("tta", "ensemble") else (False,)

    # Preprocess once per distinct (spacing, normalisation) among the models.
    t = time.perf_counter()
    prepared = {}
    for p in packages:
        key = (tuple(p.spacing), p.normalisation)
        if key not in prepared:
            prepared[key] = model_slices(volume, key[0], allow_reslice=options.allow_reslice,
                                         normalisation=key[1])
    layout, info = next(iter(prepared.values()))[1:]
    if info["nonfinite_voxels_zeroed"]:
        warnings.append(f"{info['nonfinite_voxels_zeroed']} NaN/infinite voxels were treated as 0")
    if layout.resliced:
        warnings.append("the input is not a sagittal stack; it was resliced sagittally on request (coarse)")
    timings["preprocess"] = time.perf_counter() - t
    t = time.perf_counter()  # (with BN adaptation this includes its pass over the volume)
    runners = [_Runner(p, device, options, warnings, prepared[(tuple(p.spacing), p.normalisation)][0], is_cancelled)
               for p in packages]
    timings["load_models"] = time.perf_counter() - t

    n_slices = next(iter(prepared.values()))[0].shape[0]
    plane_in = tuple(layout.to_canonical(volume.array).shape[1:])
    total = sum(_count_batches(n_slices, tuple(prepared[(r.spec.spacing, k[1])][0].shape[1:]), r, flips, options)
                for r in runners for k in [next(k for k in prepared if k[0] == r.spec.spacing)])
    done = [0]

    def tick():
        done[0] += 1
        if progress:
            progress(done[0], total)

    labels_c = np.zeros((n_slices,) + plane_in, dtype=np.uint8)
    conf_c = np.zeros((n_slices,) + plane_in, dtype=np.float32) if options.confidence else None
    entropy_sum, fg_voxels = 0.0, 0
    counts = np.zeros(256, dtype=np.int64)
    t_inf = time.perf_counter()
    smoother = SliceSmoother(n_slices, layout.slice_spacing, options.slice_smoothing_mm, options.chunk_slices)
    for c0 in range(0, n_slices, options.chunk_slices):
        c1 = min(n_slices, c0 + options.chunk_slices)
        mean = None
        for r in runners:
            if is_cancelled():
                raise Cancelled("segmentation cancelled")
            key = next(k for k in prepared if k[0] == r.spec.spacing)
            stack = neighbour_stack(prepared[key][0], c0, c1, r.spec.slice_context)

            def tick_checked():
                tick()
                if is_cancelled():
                    raise Cancelled("segmentation cancelled")

            probs = _predict_chunk(r, stack, flips, options, tick_checked)
            probs = resize_planes(probs, plane_in, mode="bilinear")
            order = [r.spec.schema.channel_of()[cid] for cid in schema.ids]  # match channels by id
            if order != list(range(len(order))):
                probs = probs[:, order]
            mean = probs if mean is None else mean.add_(probs)  # (probs is a fresh tensor: safe to reuse)
        if len(runners) > 1:
            mean /= len(runners)
        for s0, block in smoother.push(mean):  # none yet while slices wait for their neighbours
            s1 = s0 + block.shape[0]
            pmax, arg = block.max(dim=1)
            chunk_labels = schema.channels_to_values(arg.numpy())
            labels_c[s0:s1] = chunk_labels
            counts += np.bincount(chunk_labels.ravel(), minlength=256)  # per block: bounded memory
            fg = torch.from_numpy(chunk_labels != 0)  # background by value, wherever its channel is
            n_fg = int(fg.sum())
            if n_fg:  # mean entropy over the foreground voxels (masked sum: no boolean gather)
                p_safe = block.clamp_min_(1e-8)  # ``block`` is not used after this
                ent = (p_safe * p_safe.log()).sum(dim=1).neg_()
                entropy_sum += float(ent.mul_(fg).sum())
            fg_voxels += n_fg
            if conf_c is not None:
                conf_c[s0:s1] = pmax.numpy()
    timings["inference"] = time.perf_counter() - t_inf
    if any(r.onnx is not None and r.onnx.exported_s for r in runners):  # inside "inference": the first run only
        timings["onnx_export"] = sum(r.onnx.exported_s for r in runners if r.onnx is not None)

    t = time.perf_counter()
    if options.postprocess != "none":
        from LumbarSegmentLib.inference.postprocess import apply as postprocess

        spacing = (layout.slice_spacing, *layout.inplane_spacing)
        labels_c, pp = postprocess(options.postprocess, labels_c, spacing)
        if pp.get("removed_voxels"):
            counts = np.bincount(labels_c.ravel(), minlength=256)
        postprocessed = {"postprocess": {"mode": options.postprocess, **pp}}
    else:
        postprocessed = {}
    labels = volume.with_array(np.ascontiguousarray(layout.from_canonical(labels_c)))
    confidence = (volume.with_array(np.ascontiguousarray(layout.from_canonical(conf_c)))
                  if conf_c is not None else None)
    timings["postprocess"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    report = {**_report(volume, schema, runners, options, layout, info, n_slices, counts, entropy_sum, fg_voxels,
                        timings, warnings), **postprocessed}
    return SegmentationResult(labels=labels.with_array(labels.array, kind="labels"), schema=schema,
                              confidence=confidence, report=report)
