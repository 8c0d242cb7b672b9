"""What the Slicer module does, without Qt: the module logic over the background jobs.

Importable in plain Python (no ``qt``/``slicer`` import at module level), so every piece
is unit-tested outside Slicer. The module's widget only calls :class:`ModuleLogic`, polls
it from a ``QTimer`` and shows what it reports. The jobs live below this module:
``jobs`` (processes, command lines, status), ``segment_job``, ``retrain_job``; their public
names are re-exported here for the shell and for scripts.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

from LumbarSegmentLib.slicer.click_tool import ClickTool
from LumbarSegmentLib.slicer.effort_watch import EffortWatch, was_drafted
from LumbarSegmentLib.slicer.jobs import (CANCELLED, DONE, FAILED, IDLE, RUNNING, BackgroundProcess, ControllerError,  # noqa: F401
                   PidHandle, Status, alive, child_command, child_environment, descendants, kill_process_tree,
                   popen_runner, python_executable)
from LumbarSegmentLib.core.progress import JsonLinesTail, describe, format_duration  # noqa: F401
from LumbarSegmentLib.slicer.retrain_job import RUN_FILE, RetrainController, publish_command, train_command  # noqa: F401
from LumbarSegmentLib.slicer.segment_job import SegmentController, SegmentRequest, SegmentRun, segment_command  # noqa: F401
from LumbarSegmentLib.slicer.worker_client import WarmWorker

class ModuleLogic:
    """Everything the Slicer module does, given the scene and the Segmentations logic.

    The module's ``LumbarSegmentLogic`` builds one with ``slicer.mrmlScene`` and
    ``slicer.modules.segmentations.logic()``; tests build one on a standalone scene.
    Controllers and the dependency installer are injectable.
    """

    def __init__(self, scene, seg_logic, *, segmenter: SegmentController | None = None,
                 trainer: RetrainController | None = None, installer=None, registries=None):
        self.scene = scene
        self.seg_logic = seg_logic
        self.segmenter = segmenter or SegmentController(worker=WarmWorker())  # drafts in a warm process
        self.trainer = trainer or RetrainController()
        self.installer = installer
        self.registries = registries
        self._volume_node = None
        self._update_node = None
        self.clicks = ClickTool(scene, seg_logic, registries)  # "click to fix" and the effort ledgers
        self.effort = EffortWatch(self.clicks)  # drafts and active time: the hand side of the ledgers

    # --- models -------------------------------------------------------------------------
    def model_choices(self) -> list[tuple[str, str]]:
        """``(label, ref)`` for every installed model, each ref once, the default in use first.

        The label says where the model comes from (shipped or user registry) and, for a
        fine-tune, its parent. A broken registry is skipped, never a crash.
        """
        from LumbarSegmentLib.registry.catalog import Catalog

        rows = []
        for e in Catalog(self.registries).entries(skip_broken=True):
            p = e.package
            origin = e.source + (f", from {p.parent['ref']}" if p.parent else "")
            label = (f"{p.ref} ({p.manifest['architecture'].get('variant', '?')}, {p.schema.name}; {origin})"
                     + (" - default" if e.default else ""))
            rows.append((label, p.ref))
        return rows

    def ensure_dependencies(self, confirm: Callable[[str], bool]):
        """Install missing packages after asking (see ``slicer_deps``); returns the InstallResult."""
        from LumbarSegmentLib.slicer.deps import DependencyInstaller

        installer = self.installer or DependencyInstaller(confirm=confirm)
        if installer.confirm is None:
            installer.confirm = confirm
        return installer.ensure()

    # --- segmentation ---------------------------------------------------------------------
    def start_segmentation(self, volume_node, request: SegmentRequest, update_node=None) -> list[str]:
        """Check the input and launch the run; returns orientation notes to show the user."""
        from LumbarSegmentLib.slicer import mrml
        from LumbarSegmentLib.core.geometry import axis_codes, sagittal_layout

        volume = mrml.node_to_volume(volume_node, apply_transform=False)  # the frame mrml works in
        layout = sagittal_layout(volume, allow_reslice=request.options.allow_reslice)  # OrientationError: clear message
        notes = []
        if layout.resliced:
            notes.append("not a sagittal stack: sagittal slices are cut from it (coarse in-plane resolution)")
        if layout.obliquity_deg > 5:
            notes.append(f"the stack is tilted {layout.obliquity_deg:.0f} degrees off sagittal "
                         f"(orientation {axis_codes(volume.direction)})")
        self._volume_node, self._update_node = volume_node, update_node
        self.segmenter.start(volume, request)
        return notes

    def poll_segmentation(self) -> Status:
        return self.segmenter.poll()

    def cancel_segmentation(self) -> None:
        self.segmenter.cancel()

    def shift_level_names(self, seg_node, steps: int) -> list[str]:
        """The module's "Levels up/down": every level segment renamed one level, all or none."""
        from LumbarSegmentLib.slicer.levels import shift_level_names

        if seg_node is None:
            raise ValueError("choose the level segmentation first (segment with Levels on)")
        if not self._has_levels(seg_node):
            raise ValueError(f"{seg_node.GetName()} has no level segments (L1, L4-L5, ...): segment with Levels on")
        return shift_level_names(seg_node, steps)

    @staticmethod
    def _has_levels(seg_node) -> bool:
        from LumbarSegmentLib.slicer.levels import level_list

        return bool(level_list(seg_node))

    def finish_segmentation(self):
        """Turn the finished run into a segmentation node (new, or the update of an existing one).

        Returns ``(segmentation node, info)`` where ``info`` holds the run report and,
        in update mode, which segments were re-drafted or kept.
        """
        from LumbarSegmentLib.slicer import mrml

        run = self.segmenter.result()
        info = {"report": run.report}
        with self.effort.quiet():  # the model's work, not the annotator's
            seg_node = self._draft_node(run, info)
        self.effort.remember_draft(seg_node, run.labels.array)  # what the export's hand edits are counted from
        self.effort.watch(seg_node)
        if run.confidence is not None:  # on the volume's own grid: it goes under the volume's transform too
            conf = mrml.volume_to_node(self.scene, run.confidence, f"{self._volume_node.GetName()} confidence")
            mrml.follow_transform(conf, self._volume_node)
            info["confidence_node"] = conf
        if run.report.get("label_values") == "levels":  # --levels: flags on the segments, the list for review
            from LumbarSegmentLib.slicer.levels import level_list, tag_flags

            tag_flags(seg_node, run.report["levels"])
            info["levels"] = level_list(seg_node)
        kept = info.get("update", {}).get("kept")
        info["summary"] = (f"Done: {seg_node.GetName()} ({len(mrml.segment_ids(seg_node))} segments, "
                           f"{run.report.get('timings_s', {}).get('total', 0):.1f} s on {run.report.get('device')})"
                           + (f"; your edits were kept: {', '.join(kept)}" if kept else "")
                           + _levels_summary(run.report))
        return seg_node, info

    def _draft_node(self, run, info: dict):
        """The run's labels as a new segmentation node, or as the update of the one being re-drafted."""
        from LumbarSegmentLib.slicer import mrml

        if self._update_node is not None:
            info["update"] = mrml.update_unedited_segments(
                self.scene, self.seg_logic, self._update_node, run.labels, run.schema, self._volume_node,
                model_ref=run.model_ref, model_sha256=run.model_sha256)
            return self._update_node
        origin = mrml.DraftOrigin(run.model_ref, run.model_sha256, run.report)
        return mrml.labels_to_segmentation(self.scene, self.seg_logic, run.labels, run.schema,
                                           self._volume_node, origin=origin)

    def segment(self, volume_node, request: SegmentRequest | None = None, *, update_node=None,
                timeout: float | None = None, progress: Callable[[Status], None] | None = None):
        """Blocking: segment ``volume_node`` and return ``(segmentation node, info)``."""
        request = request or SegmentRequest()
        self.start_segmentation(volume_node, request, update_node)
        self.segmenter.wait(timeout, progress=progress)  # the jobs' one poll loop (Job.wait)
        return self.finish_segmentation()

    # --- export ---------------------------------------------------------------------------
    def export(self, volume_node, seg_node, dataset_folder, case_id: str, *, annotated_structures=None,
               schema=None):
        """Write a training case (see ``mrml.export_case``); the schema is the one the node was drafted with.

        The segmentation's effort ledger goes with it, the same from the Slicer panel and from the browser
        page, which both export through here: clicks and active time as counted, voxels painted and erased
        by hand from the exported label map against the draft (see ``effort_watch``)."""
        from LumbarSegmentLib.slicer import mrml
        from LumbarSegmentLib.registry.catalog import resolve_model

        schema = schema or mrml.schema_of_node(seg_node)
        if schema is None:
            schema = resolve_model(None, self.registries).schema
        self.effort.watch(seg_node, volume_node)  # a draft exported untouched, never watched: its draft is now
        labels = mrml.segmentation_to_labels(self.scene, self.seg_logic, seg_node, volume_node, schema).array
        effort = self.effort.record(seg_node, labels, drafted=was_drafted(seg_node))
        request = mrml.ExportRequest(dataset_folder, case_id, annotated_structures=annotated_structures,
                                     effort=effort)
        return mrml.export_case(self.scene, self.seg_logic, volume_node, seg_node, schema, request)

    def watch(self, seg_node, volume_node=None) -> None:
        """Count the annotator's edits of ``seg_node`` as active time and know its draft (see ``effort_watch``).

        The front ends call it when a segmentation becomes the one being edited; calling it again is harmless."""
        self.effort.watch(seg_node, volume_node)

    def edited_structures(self, seg_node) -> list[str]:
        from LumbarSegmentLib.slicer import mrml

        return mrml.edited_segments(seg_node)

    def export_warning(self, seg_node) -> str | None:
        """A question for the user when the segmentation is still the model's untouched draft, else ``None``.

        Exporting an uncorrected draft teaches the model its own mistakes; it is allowed
        (the draft may be right) but never silently.
        """
        from LumbarSegmentLib.slicer import mrml

        if seg_node is None or not mrml.drafted_by(seg_node) or self.edited_structures(seg_node):
            return None
        return (f"Nothing in {seg_node.GetName()!r} was corrected: it is the model's draft as it came. Training on "
                f"it teaches the model its own output. Export it anyway?")

    # --- retraining -----------------------------------------------------------------------
    def start_retrain(self, dataset_folder, output_folder=None, extra_args: Sequence[str] = (),
                      base_model: str | None = None, *, epochs: int | None = None,
                      max_minutes: float | None = None) -> Path:
        """Fine-tune ``base_model`` (``None``: train from scratch) on the dataset's training split.

        Returns the run folder (under the user's LumbarSegment folder unless given).
        """
        if output_folder is None:
            output_folder = self.training_root() / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
        kwargs = {k: v for k, v in (("epochs", epochs), ("max_minutes", max_minutes)) if v}
        self.trainer.start(dataset_folder, output_folder, extra_args, base_model=base_model, **kwargs)
        return Path(output_folder)

    @staticmethod
    def training_root() -> Path:
        from LumbarSegmentLib.registry.registry import user_registry_root

        return user_registry_root().parent / "training"

    def reattach_retrain(self, output_folder=None) -> Status | None:
        """Follow the newest run (or ``output_folder``) an earlier panel started; ``None`` if there is none."""
        folders = [Path(output_folder)] if output_folder else sorted(
            self.training_root().glob(f"run-*/{RUN_FILE}"), key=lambda f: f.stat().st_mtime, reverse=True)
        for f in folders:
            folder = f if f.is_dir() else f.parent
            if (folder / RUN_FILE).is_file():
                return self.trainer.reattach(folder)
        return None

    def resume_retrain(self) -> None:
        self.trainer.resume()

    def poll_retrain(self) -> Status:
        """Poll training (then grading and publishing: see :class:`RetrainController`)."""
        return self.trainer.poll()

    def stop_retrain(self) -> None:
        self.trainer.stop()


def self_test_loop(core: ModuleLogic, folder, *, use_model: bool = True, timeout: float = 600):
    """The whole loop on a synthetic sagittal volume: draft, edit one segment, export, read back.

    Drafts with the default model when one is installed (and it finds something), else
    with a synthetic label map. Used by the module's self-test and by the unit tests.
    """
    import numpy as np

    from LumbarSegmentLib.slicer import mrml
    from LumbarSegmentLib.dataset.cases import read_case
    from LumbarSegmentLib.core.schema import load_schema
    from LumbarSegmentLib.core.volume import Volume

    rng = np.random.default_rng(0)
    volume = Volume((rng.random((64, 64, 12)) * 100).astype(np.int16), spacing=(1.0, 1.0, 3.0),
                    direction=np.array([[0.0, 0, 1], [1, 0, 0], [0, -1, 0]]))
    node = mrml.volume_to_node(core.scene, volume, "synthetic sagittal")
    seg = None
    if use_model and core.model_choices():
        seg, _ = core.segment(node, SegmentRequest.of(device="cpu"), timeout=timeout)
    if seg is None or not mrml.segment_ids(seg):  # no model, or it found nothing in noise
        labels = np.zeros(volume.shape, np.uint8)
        labels[10:30, 10:30, 4:8], labels[35:40, 10:30, 4:8] = 1, 2
        seg = mrml.labels_to_segmentation(core.scene, core.seg_logic, volume.with_array(labels),
                                          load_schema("starter"), node)
    first = mrml.segment_ids(seg)[0]
    mask = mrml.segment_mask(seg, first, node)
    mask[0, 0, 0] = not mask[0, 0, 0]
    mrml.set_segment_mask(core.seg_logic, seg, first, mask, node)
    if mrml.edited_segments(seg) != [first]:
        raise AssertionError(f"edit tracking failed: {mrml.edited_segments(seg)} instead of [{first!r}]")
    case = core.export(node, seg, folder, "selftest")
    back = read_case(case.json_path)
    if back.extra.get("edited_structures") != [first]:
        raise AssertionError(f"the exported case records edits {back.extra.get('edited_structures')}")
    return back



def _levels_summary(report: dict) -> str:
    """One line for the status: the levels and what to check (empty without --levels)."""
    if report.get("label_values") != "levels":
        return ""
    o = report["ordering"]
    checks = "; ".join(f"check {f['level'] or 'the count'}: {f['code']}" for f in o["flags"])
    return (f"\nLevels: {' '.join(lv['name'] for lv in report['levels'])} (ordering confidence "
            f"{o['confidence']:.2f}{'; ' + checks if checks else ''})")


__all__ = ["ModuleLogic", "self_test_loop", "SegmentController", "SegmentRequest", "SegmentRun", "RetrainController",
           "JsonLinesTail", "BackgroundProcess", "kill_process_tree", "describe", "Status", "ControllerError",
           "popen_runner", "child_environment", "child_command", "python_executable", "train_command",
           "publish_command", "segment_command", "IDLE", "RUNNING", "DONE", "FAILED", "CANCELLED"]
