"""The inference engine: a Volume and model package(s) in, a label map on the exact input grid out.

Knows nothing of Slicer. The steps, per chunk of sagittal slices (memory stays
bounded whatever the volume size):

1. ``preprocess.model_slices``: canonical slices, normalised, at each model's spacing;
2. sliding window (:mod:`windows`: the model's patch size, Gaussian-weighted blending where windows
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

The models run in :mod:`runners`: before the first batch each loaded model (with ``bn_adapt`` > 0,
off by default, its BatchNorm statistics first re-estimated on the volume's own slices: :mod:`bn_adapt`)
is turned into an equivalent, cheaper inference graph (:func:`graph_rewrite.inference_graph`): BatchNorm
folded into the preceding convolution and PReLU evaluated as ``max(x, a*x)`` (docs/benchmarks.md says
what that buys on a CPU).

Runtimes (``runtime``): PyTorch computes the network, or ONNX Runtime or OpenVINO on the CPU in float32
(:mod:`onnx_runner`, :mod:`openvino_runner`: the same inference graph exported, cached per weights and
plane size); only
the network changes hands, every other step above is the same. The report (:mod:`run_report`) names
the runtime. With ONNX Runtime or OpenVINO, models given as packages, float32 on the CPU and no
BatchNorm adaptation, the steps run on NumPy arrays instead of PyTorch tensors and PyTorch is never
imported unless a graph must be exported (:mod:`host_runner`, :mod:`arrays`); for these runtimes
device ``auto`` is the CPU.

:func:`segment_volume` runs the steps in the shape of nnU-Net's predictor: ``prepare`` (options and
models checked, slices preprocessed, models loaded), ``probabilities`` (per chunk, averaged over the
models), ``label`` (across-slice average, argmax, confidence, tally) and ``finish`` (post-processing,
back to the input's array order, report).

Devices: ``auto`` picks CUDA, then MPS, then CPU. On CUDA the model runs in
channels_last with fp16/bf16 autocast; a CUDA out-of-memory error halves the
batch and, at batch 1, moves the run to the CPU (reported in ``warnings``).
``progress(done, total)`` is called after every batch and ``cancel()`` checked
before each; cancelling raises :class:`runners.Cancelled` and the engine writes nothing
(it never writes files at all: the caller does, after success).
"""
from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from LumbarSegmentLib.core.geometry import resize_planes
from LumbarSegmentLib.core.schema import LabelSchema
from LumbarSegmentLib.core.volume import Volume
from LumbarSegmentLib.inference.arrays import ops
from LumbarSegmentLib.inference.devices import EngineError, pick_device
from LumbarSegmentLib.inference.host_runner import HostRunner, device_name, runs_without_torch
from LumbarSegmentLib.inference.options import MODES, SegmentOptions  # noqa: F401  (part of the engine's API)
from LumbarSegmentLib.inference.preprocess import model_slices
from LumbarSegmentLib.inference.run_report import LabelTally, RunRecord, run_report
from LumbarSegmentLib.inference.runners import Cancelled, LoadedModel, Runner, check_models  # noqa: F401  (API)
from LumbarSegmentLib.inference.slice_smoothing import SliceSmoother, neighbour_stack
from LumbarSegmentLib.inference.windows import count_batches, predict_chunk
from LumbarSegmentLib.registry.package import ModelPackage

# OpenMP threads that busy-wait between operations (libgomp's default) are badly hurt when other
# processes share the cores (a clinical VM, a CI runner, a training job next door): each
# operation then waits for a preempted sibling thread. Sleeping instead cost nothing measurable
# here and made a 15-slice CPU run 2.6x faster on 2 busy cores (docs/benchmarks.md). libgomp
# reads the policy once, when torch is first imported, so it can only be chosen here when this
# module is imported before torch (the CLI does so); a policy set by the user is kept.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@dataclass
class SegmentationResult:
    labels: Volume  # uint8, values of ``schema``, on the input grid
    schema: LabelSchema
    confidence: Volume | None
    report: dict = field(default_factory=dict)


class _Prediction:
    """One run of :func:`segment_volume`, step by step; holds what the steps hand each other."""

    def __init__(self, volume: Volume, options: SegmentOptions, progress, cancelled: Callable[[], bool],
                 host: bool = False):
        self.volume, self.options, self.progress, self.cancelled = volume, options, progress, cancelled
        self.host = host  # True: NumPy arrays and :class:`host_runner.HostRunner` s, no PyTorch
        self.timings: dict[str, float] = {}
        self.warnings: list[str] = []
        self.stepped = None  # ``--slice-step``: what :class:`slice_step.SliceStepper` computed
        self.t0 = time.perf_counter()

    def prepare(self, models: list[LoadedModel]) -> None:
        """Slices preprocessed once per distinct (spacing, normalisation) among the models; models loaded."""
        opts = self.options
        t = time.perf_counter()
        self.prepared = {}
        for p in models:
            key = (tuple(p.spacing), p.normalisation)
            if key not in self.prepared:
                self.prepared[key] = model_slices(self.volume, key[0], allow_reslice=opts.allow_reslice,
                                                  normalisation=key[1], arrays="numpy" if self.host else "torch")
        self.layout, self.info = next(iter(self.prepared.values()))[1:]
        if self.info["nonfinite_voxels_zeroed"]:
            self.warnings.append(f"{self.info['nonfinite_voxels_zeroed']} NaN/infinite voxels were treated as 0")
        if self.layout.resliced:
            self.warnings.append("the input is not a sagittal stack; it was resliced sagittally on request (coarse)")
        self.timings["preprocess"] = time.perf_counter() - t
        t = time.perf_counter()  # (with BN adaptation this includes its pass over the volume)
        slices = [self.prepared[(tuple(p.spacing), p.normalisation)][0] for p in models]
        if self.host:
            self.runners = [HostRunner(p, opts, s) for p, s in zip(models, slices)]
        else:
            device = pick_device(device_name(opts))
            self.runners = [Runner(p, device, opts, self.warnings, s, self.cancelled) for p, s in zip(models, slices)]
        self.timings["load_models"] = time.perf_counter() - t
        self.n_slices = next(iter(self.prepared.values()))[0].shape[0]
        self.plane_in = tuple(self.layout.to_canonical(self.volume.array).shape[1:])
        self.box = self._roi() if opts.roi else None
        # the box on the input's own grid (model plane = input plane: nothing to resample): then the steps
        # after the network run inside it too, and what lies outside is background without being computed
        self.label_box = self.box if self.box is not None and tuple(self.box.plane) == self.plane_in else None

    def _roi(self):
        """``--roi``: the box of the first model's scout (:mod:`roi`), when every model shares its plane."""
        from LumbarSegmentLib.inference.roi import find_box

        t = time.perf_counter()
        first = self.runners[0]
        if any(r.spec.spacing != first.spec.spacing for r in self.runners):
            self.warnings.append("--roi needs models of one spacing: the whole plane was segmented")
            return None
        box = find_box(first, self._stack(first), self.options, self._check_cancel)
        self.timings["roi_scout"] = time.perf_counter() - t
        return box

    def _stack(self, runner: Runner):
        """The model-space slices a runner reads (the first prepared stack at its spacing)."""
        return self.prepared[next(k for k in self.prepared if k[0] == runner.spec.spacing)][0]

    def _check_cancel(self) -> None:
        if self.cancelled():
            raise Cancelled("segmentation cancelled")

    def probabilities(self, schema: LabelSchema):
        """Per chunk of slices: ``(first slice, probabilities [n, K, H, W])`` on the input's in-plane grid
        (inside ``label_box`` only, when there is one), channels in ``schema``'s order (matched by class id),
        averaged over the models."""
        flips = (False, True) if self.options.mode in ("tta", "ensemble") else (False,)
        steppers = self._steppers(flips)
        computed = steppers[0].anchor_count() if steppers else self.n_slices
        total = sum(count_batches(computed, self.box.size if self.box else tuple(self._stack(r).shape[1:]),
                                  r, flips, self.options) for r in self.runners)
        done = [0]

        def tick():
            done[0] += 1
            if self.progress:
                self.progress(min(done[0], total), total)  # (redone slices may pass the estimate)
            self._check_cancel()

        self._tick = tick
        chunk = self.options.chunk_slices
        for c0 in range(0, self.n_slices, chunk):
            c1 = min(self.n_slices, c0 + chunk)
            mean = None
            for i, r in enumerate(self.runners):
                self._check_cancel()
                if steppers:
                    probs = steppers[i].chunk(c0, c1)
                else:
                    probs = self._predict(r, flips, neighbour_stack(self._stack(r), c0, c1, r.spec.slice_context))
                if self.label_box is None:
                    probs = resize_planes(probs, self.plane_in, mode="bilinear")
                order = [r.spec.schema.channel_of()[cid] for cid in schema.ids]  # match channels by id
                if order != list(range(len(order))):
                    probs = probs[:, order]
                if mean is None:
                    mean = probs
                else:
                    mean += probs  # (probs is a fresh array: safe to reuse)
            if len(self.runners) > 1:
                mean /= len(self.runners)
            yield c0, mean
        self.stepped = steppers[0].report() if steppers else None

    def _predict(self, r, flips, stack):
        """Probabilities of the network input ``stack`` (inside the box, with ``--roi``)."""
        if self.box is None:
            return predict_chunk(r, stack, flips, self.options, self._tick)
        return self._boxed(r, stack, flips, self._tick)

    def _steppers(self, flips) -> list:
        """``--slice-step``: a :class:`slice_step.SliceStepper` per model, or none where it does not apply."""
        from LumbarSegmentLib.inference.roi import background_channel
        from LumbarSegmentLib.inference.slice_smoothing import slice_inputs
        from LumbarSegmentLib.inference.slice_step import SliceStepper, step_applies

        step = self.options.slice_step
        if not step_applies(step, self.n_slices, self.layout.slice_spacing):
            return []

        def predictor(r):
            return lambda idx: self._predict(r, flips, slice_inputs(self._stack(r), idx, r.spec.slice_context))

        return [SliceStepper(self.n_slices, step, predictor(r), background_channel(r), float(np.prod(r.spec.spacing)))
                for r in self.runners]

    def _boxed(self, r, stack, flips, tick):
        """``--roi``: the probabilities of ``stack`` computed inside the box only; in the box's frame when it
        is on the input's grid (``label_box``), else on the whole model plane with background outside."""
        probs = predict_chunk(r, self.box.cut(stack), flips, self.options, tick)
        if self.label_box is not None:
            return probs
        from LumbarSegmentLib.inference.roi import background_channel

        return self.box.paste(probs, background_channel(r))

    def label(self, schema: LabelSchema):
        """The label map (schema values) and optional confidence in canonical order, and their tally."""
        labels_c = np.zeros((self.n_slices,) + self.plane_in, dtype=np.uint8)  # (0: background's value)
        conf_c = np.zeros((self.n_slices,) + self.plane_in, dtype=np.float32) if self.options.confidence else None
        tally = LabelTally()
        box = self.label_box
        inside = (slice(None), slice(None)) if box is None else (slice(box.y0, box.y1), slice(box.x0, box.x1))
        if box is not None:  # outside the box: background, with probability 1
            tally.counts[0] += self.n_slices * (self.plane_in[0] * self.plane_in[1] - box.size[0] * box.size[1])
            if conf_c is not None:
                conf_c[:] = 1.0
        t_inf = time.perf_counter()
        smoother = SliceSmoother(self.n_slices, self.layout.slice_spacing, self.options.slice_smoothing_mm,
                                 self.options.chunk_slices)
        for _, mean in self.probabilities(schema):
            for s0, block in smoother.push(mean):  # none yet while slices wait for their neighbours
                s1 = s0 + block.shape[0]
                pmax, arg = ops(block).channel_max(block)
                chunk_labels = schema.channels_to_values(arg)
                labels_c[(slice(s0, s1),) + inside] = chunk_labels
                tally.add(chunk_labels, block)  # ``block`` is not used after this
                if conf_c is not None:
                    conf_c[(slice(s0, s1),) + inside] = pmax
        self.timings["inference"] = time.perf_counter() - t_inf
        onnx = [r.onnx for r in self.runners if r.onnx is not None]
        if any(o.exported_s for o in onnx):  # inside "inference": the first run only
            self.timings["onnx_export"] = sum(o.exported_s for o in onnx)
        return labels_c, conf_c, tally

    def finish(self, schema: LabelSchema, labels_c, conf_c, tally: LabelTally) -> SegmentationResult:
        """Post-processing, back to the input's array order, the report."""
        t = time.perf_counter()
        postprocessed = {}
        if self.options.postprocess != "none":
            from LumbarSegmentLib.inference.postprocess import apply as postprocess

            spacing = (self.layout.slice_spacing, *self.layout.inplane_spacing)
            labels_c, pp = postprocess(self.options.postprocess, labels_c, spacing)
            if pp.get("removed_voxels"):
                tally.recount(labels_c)
            postprocessed = {"postprocess": {"mode": self.options.postprocess, **pp}}
        volume, layout = self.volume, self.layout
        labels = volume.with_array(np.ascontiguousarray(layout.from_canonical(labels_c)))
        confidence = (volume.with_array(np.ascontiguousarray(layout.from_canonical(conf_c)))
                      if conf_c is not None else None)
        self.timings["postprocess"] = time.perf_counter() - t
        self.timings["total"] = time.perf_counter() - self.t0
        record = RunRecord(volume=volume, schema=schema, runners=self.runners, options=self.options, layout=layout,
                           normalisation=self.info, n_slices=self.n_slices, tally=tally, timings=self.timings,
                           warnings=self.warnings)
        return SegmentationResult(labels=labels.with_array(labels.array, kind="labels"), schema=schema,
                                  confidence=confidence, report={**run_report(record), **postprocessed,
                                                                 **self._roi_report(), **self._step_report()})

    def _step_report(self) -> dict:
        if self.options.slice_step == 1:
            return {}
        return {"slice_step": self.stepped or {"step": 1, "why": "every slice computed: the step applies to stacks of "
                                          "at least 8 slices at most 1.5 mm apart"}}

    def _roi_report(self) -> dict:
        if not self.options.roi:
            return {}
        return {"roi": self.box.to_dict() if self.box is not None else None}


def segment_volume(volume: Volume, packages: Sequence[ModelPackage | LoadedModel],
                   options: SegmentOptions | None = None,
                   progress: Callable[[int, int], None] | None = None,
                   cancel: Callable[[], bool] | threading.Event | None = None) -> SegmentationResult:
    """Segment ``volume`` with one model (fast/tta) or several (ensemble); see the module doc.

    ``packages`` are model packages (loaded here) or :class:`LoadedModel` s (already in memory).
    """
    options = options or SegmentOptions()
    host = runs_without_torch(packages, options)
    models, schema = check_models(packages, options, lazy=host)
    for m in models:
        if m.guidance is not None and m.guidance.prior:
            raise EngineError(f"{m.ref} corrects a label map with clicks (it reads the current labels); it does "
                              f"not draft: segment with a drafting model and correct with lumbarseg refine")
    is_cancelled = (cancel.is_set if isinstance(cancel, threading.Event) else cancel) or (lambda: False)
    if options.threads and not host:
        import torch

        torch.set_num_threads(int(options.threads))
    run = _Prediction(volume, options, progress, is_cancelled, host)
    run.prepare(models)
    labels_c, conf_c, tally = run.label(schema)
    return run.finish(schema, labels_c, conf_c, tally)
