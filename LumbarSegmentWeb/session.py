"""One annotator's session without a web server: scene, jobs, effects, undo, export, retraining.

The page (:mod:`.app`) only binds buttons to these methods and shows what they return,
so everything an annotator can do is testable in plain pytest: the API-level tests
build a session with an offscreen slice view and drive Paint/Erase with interactor
events, exactly like the browser's mouse does through trame-slicer's remote view.

What comes from where, on purpose:

* Prediction and retraining run in the Lib's background controllers
  (``slicer_logic.ModuleLogic``: a child process per job, progress, Cancel). No
  prediction code lives here.
* The model's output becomes a segmentation node through the Lib's MRML bridge, so
  segments carry the schema's names, colours, terminology and draft tags; a re-run
  passes the current node as ``update_node`` so edited segments are kept.
* Editing uses trame-slicer's ports of Slicer's segment-editor effects on that node.
* Export goes through the Lib (``ModuleLogic.export`` -> ``mrml.export_case``): case
  format, versions, edited-structure detection. trame-slicer's own label-map export
  numbers segments by their position, which would silently scramble class values
  after a reorder, so it is never used.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from LumbarSegmentLib.slicer.logic import (
    CANCELLED, DONE, FAILED, RUNNING, ControllerError, ModuleLogic, Status,
)

from .advanced import segment_request
from .worklist import Worklist, image_fingerprint

BRUSH_EFFECTS = ("paint", "erase")
EFFECT_NAMES = ("none", "paint", "erase", "scissors", "draw", "islands", "smoothing", "threshold")
NOTHING_CORRECTED = ("nothing was corrected: every segment is exactly what the model drafted. Exporting it "
                     "teaches the model nothing new; export anyway only if the draft is right as it is")


class SessionError(RuntimeError):
    """An action the current state does not allow (no case loaded, a job running...)."""


def _effect_types() -> dict:
    from trame_slicer.segmentation import (
        SegmentationEffectDraw, SegmentationEffectErase, SegmentationEffectIslands, SegmentationEffectNoTool,
        SegmentationEffectPaint, SegmentationEffectScissors, SegmentationEffectSmoothing,
        SegmentationEffectThreshold,
    )

    return {"none": SegmentationEffectNoTool, "paint": SegmentationEffectPaint, "erase": SegmentationEffectErase,
            "scissors": SegmentationEffectScissors, "draw": SegmentationEffectDraw,
            "islands": SegmentationEffectIslands, "smoothing": SegmentationEffectSmoothing,
            "threshold": SegmentationEffectThreshold}


@dataclass
class JobView:
    """A background job as the page shows it."""

    state: str = "idle"
    fraction: float | None = None
    message: str = ""
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, status: Status) -> "JobView":
        return cls(status.state, status.fraction, status.message, list(status.warnings))

    def to_dict(self) -> dict:
        return {"state": self.state, "fraction": self.fraction, "message": self.message,
                "warnings": self.warnings}


class AnnotationSession:
    """Everything one annotator does, on trame-slicer's scene and the Lib's logic.

    ``slicer_app`` is a ``trame_slicer.core.SlicerApp``; views are created by whoever
    owns it (the page registers remote views, tests a direct offscreen view).
    ``registries`` are the model registries offered (default: the user's and the
    shipped one); ``module_logic`` can be injected (tests pass fake controllers).
    """

    def __init__(self, worklist: Worklist, slicer_app=None, *, registries=None, module_logic=None,
                 device: str = "auto", threads: int | None = None):
        from trame_slicer.core import SlicerApp
        from undo_stack import UndoStack

        self.worklist = worklist
        self.app = slicer_app or SlicerApp()
        # Effects registered before the scene's first Clear() keep view=None in their pipelines
        # (AttributeError on the first Paint): clear once, before any view or node exists.
        self.app.scene.Clear()
        self.editor = self.app.segmentation_editor
        self.undo_stack = UndoStack(undo_limit=50)
        self.editor.set_undo_stack(self.undo_stack)
        self.logic = module_logic or ModuleLogic(self.app.scene, self.app.segmentations_logic, registries=registries)
        self.registries = registries
        self.device, self.threads = device, threads
        self.case_id: str | None = None
        self.volume_node = None
        self.seg_node = None
        self.brush_mm = 5.0
        self.effect = "none"
        self.last_run: dict = {}
        self.retrain_run: Path | None = None
        self._segmenting_case: str | None = None
        self.fingerprint: str | None = None

    # ------------------------------------------------------------------ models
    def model_choices(self) -> list[dict]:
        """``[{"title", "value"}]`` for the model picker, the default first (the Lib's catalogue).

        The values are package folders, not refs: the job runs in a child process that
        resolves refs in the default registries only, while ``--models`` may name another.
        """
        from LumbarSegmentLib.registry.packages import Catalog, PackageError

        catalog = Catalog(self.registries)
        rows = []
        for label, ref in self.logic.model_choices():
            try:
                rows.append({"title": label, "value": str(catalog.get(ref).path)})
            except (PackageError, OSError, ValueError):
                continue
        return rows

    # ------------------------------------------------------------------ cases
    def offered_model(self, value) -> str | None:
        """``value`` if it is one of :meth:`model_choices` (``None``: the default); a client may not pick a folder."""
        if value in (None, ""):
            return None
        if not isinstance(value, str) or value not in {c["value"] for c in self.model_choices()}:
            raise SessionError("that model is not one this server offers; pick one from the Model list")
        return value

    def load_case(self, case_id: str) -> list[str]:
        """Open a volume of the worklist (and its saved draft, if any) in the views; returns notes to show.

        A draft is opened only on the image it was drawn on (its fingerprint, stored with it);
        a draft of another image, or one that cannot be read, is moved to ``drafts/set-aside/``
        and the case opens without it, with a note saying so.
        """
        from LumbarSegmentLib.slicer import mrml
        from LumbarSegmentLib.formats.io import read_volume

        if self.segmenting:
            raise SessionError("a segmentation is running: cancel it before opening another case")
        path = self.worklist.volumes().get(case_id)
        if path is None:
            raise SessionError(f"no case {case_id!r} in the worklist")
        if self.volume_node is not None:
            self.save_draft()
        volume = read_volume(path)  # the Lib's reader: same geometry rules as the CLI and the Slicer module
        self._clear_case()
        self.volume_node = mrml.volume_to_node(self.app.scene, volume, case_id)
        self.case_id, self.fingerprint = case_id, image_fingerprint(volume)
        self.app.display_manager.show_volume(self.volume_node, do_reset_views=True)
        self.auto_window_level()
        info, notes = self.worklist.read_info(case_id), []
        draft = self.worklist.draft_path(case_id)
        if draft.is_file():
            if info.get("image_sha256") not in (None, self.fingerprint):
                aside = self.worklist.set_aside(case_id)
                notes.append(f"the saved draft of {case_id} was drawn on a different image, so it was not opened "
                             f"(moved to {aside}); segment the case again")
                info = {}
            else:
                try:
                    self._activate(mrml.load_seg_nrrd(self.app.scene, draft, f"{case_id} segmentation"))
                except Exception as exc:  # noqa: BLE001 - any damage: set the file aside, keep the case usable
                    aside = self.worklist.set_aside(case_id)
                    notes.append(f"the saved draft of {case_id} could not be read ({exc}); it was moved to {aside} "
                                 f"and the case opened without it: segment it again")
                    info = {}
        self.last_run = info.get("run", {})
        return notes

    def upload(self, name: str, content: bytes) -> str:
        """Store an uploaded volume in the work folder and open it; returns its case id.

        The file is read before it is kept: one that is not a readable volume is refused and
        leaves nothing in ``uploads/`` or the worklist.
        """
        from LumbarSegmentLib.formats.io import read_volume

        from .worklist import case_id_for

        shown = Path(str(name)).name

        def check(path: Path) -> None:
            try:
                read_volume(path)
            except (ValueError, OSError, RuntimeError) as exc:
                raise SessionError(f"{shown}: not a readable volume, nothing was kept: "
                                   f"{str(exc).replace(str(path), shown)}") from None

        path = self.worklist.save_upload(shown, content, check=check)
        case_id = case_id_for(path)
        self.load_case(case_id)
        return case_id

    def _clear_case(self) -> None:
        for node in (self.seg_node, self.volume_node):
            if node is not None and node.GetScene() is not None:
                for i in range(node.GetNumberOfDisplayNodes()):
                    dn = node.GetNthDisplayNode(i)
                    if dn is not None:
                        self.app.scene.RemoveNode(dn)
                self.app.scene.RemoveNode(node)
        self.editor.deactivate_effect()
        self.effect = "none"
        self.undo_stack.clear()
        self.seg_node = self.volume_node = None
        self.case_id = self.fingerprint = None

    def _activate(self, seg_node) -> None:
        """Make ``seg_node`` the one the effects edit, shown as filled 2D outlines."""
        self.seg_node = seg_node
        if seg_node.GetDisplayNode() is None:
            seg_node.CreateDefaultDisplayNodes()
        self.editor.set_active_segmentation(seg_node, self.volume_node)
        self.editor.set_surface_representation_enabled(False)
        if self.effect != "none":
            self.set_effect(self.effect)

    # ------------------------------------------------------------------ segmentation job
    @property
    def segmenting(self) -> bool:
        return self.logic.segmenter.running

    def start_segmentation(self, model: str | None = None, mode: str = "fast", levels: bool = False,
                           advanced: dict | None = None) -> list[str]:
        """Launch the Lib's segmentation job on the open volume; returns orientation notes.

        ``advanced``: the page's Advanced values (:data:`.advanced.FIELDS` only; the server chose the
        device and threads), checked like ``lumbarseg segment``'s flags. With a segmentation already
        open, the run updates it: segments the annotator edited are kept, the others are replaced.
        """
        if self.volume_node is None:
            raise SessionError("open a case first")
        try:
            request = segment_request(model, mode, levels, advanced, device=self.device, threads=self.threads)
        except ValueError as exc:  # OptionError: names the setting and what to give
            raise SessionError(str(exc)) from None
        notes = self.logic.start_segmentation(self.volume_node, request, update_node=self.seg_node)
        self._segmenting_case = self.case_id
        return notes

    def poll_segmentation(self) -> JobView:
        """Advance the job; when it has just finished, put its result in the scene."""
        status = self.logic.poll_segmentation()
        if status.state == DONE and self._segmenting_case is not None:
            self._segmenting_case = None
            seg_node, info = self.logic.finish_segmentation()
            self._activate(seg_node)
            self.last_run = self._run_summary(info)
            self.save_draft()
            return JobView(DONE, 1.0, info.get("summary", status.message), list(status.warnings))
        if status.state in (FAILED, CANCELLED):
            self._segmenting_case = None
        return JobView.of(status)

    def cancel_segmentation(self) -> None:
        self.logic.cancel_segmentation()
        self._segmenting_case = None

    def wait_segmentation(self, timeout: float = 300.0, interval: float = 0.2) -> JobView:
        """Block until the job ends (scripts and tests); raises on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            view = self.poll_segmentation()
            if view.state not in (RUNNING,):
                return view
            if time.monotonic() > deadline:
                self.cancel_segmentation()
                raise SessionError(f"the segmentation did not finish within {timeout:.0f} s")
            time.sleep(interval)

    @staticmethod
    def _run_summary(info: dict) -> dict:
        report = info.get("report") or {}
        unc = (report.get("uncertainty") or {}).get("mean_entropy_foreground")
        return {"models": [m.get("ref") for m in report.get("models") or []], "device": report.get("device"),
                "seconds": (report.get("timings_s") or {}).get("total"), "uncertainty": unc,
                "kept": (info.get("update") or {}).get("kept", []),
                "levels": info.get("levels", []), "ordering": report.get("ordering")}  # a --levels run

    # ------------------------------------------------------------------ drafts and state
    def edited_segments(self) -> list[str]:
        return list(self.logic.edited_structures(self.seg_node)) if self.seg_node is not None else []

    def save_draft(self) -> Path | None:
        """Write the segmentation to ``<work>/drafts`` with what the worklist needs to know."""
        from LumbarSegmentLib.slicer import mrml

        if self.seg_node is None or self.case_id is None:
            return None
        path = mrml.save_seg_nrrd(self.app.scene, self.seg_node, self.worklist.draft_path(self.case_id))
        info = {"case_id": self.case_id, "edited": self.edited_segments(), "run": self.last_run,
                "uncertainty": self.last_run.get("uncertainty"), "saved": time.time(),
                "image_sha256": self.fingerprint}
        self.worklist.write_info(self.case_id, info)
        return path

    # ------------------------------------------------------------------ levels (a --levels draft)
    def levels(self) -> list[dict]:
        """The level segments cranial to caudal with their flags (empty for a draft without levels)."""
        from LumbarSegmentLib.slicer.levels import level_list

        return level_list(self.seg_node) if self.seg_node is not None else []

    def shift_levels(self, steps: int) -> list[str]:
        """Every level name ``steps`` levels down (+1) or up (-1), all or none; the draft is saved."""
        from LumbarSegmentLib.slicer.levels import shift_level_names

        if self.seg_node is None:
            raise SessionError("open a case first")
        names = shift_level_names(self.seg_node, steps)
        self.save_draft()
        return names

    # ------------------------------------------------------------------ editing
    def segments(self) -> list[dict]:
        """One row per segment: id, name, colour, visibility and voxel count (exact, on the volume grid)."""
        from LumbarSegmentLib.slicer import mrml

        if self.seg_node is None:
            return []
        edited = set(self.edited_segments())
        seg = self.seg_node.GetSegmentation()
        rows = []
        for sid in mrml.segment_ids(self.seg_node):
            segment = seg.GetSegment(sid)
            r, g, b = (int(round(255 * c)) for c in segment.GetColor())
            rows.append({"id": sid, "name": segment.GetName(), "color": f"#{r:02x}{g:02x}{b:02x}",
                         "visible": bool(self.editor.get_segment_visibility(sid)),
                         "voxels": int(self.voxel_count(sid)), "edited": sid in edited})
        return rows

    def voxel_count(self, segment_id: str) -> int:
        from LumbarSegmentLib.slicer import mrml

        return int(mrml.segment_mask(self.seg_node, segment_id, self.volume_node).sum())

    def add_segment(self, name: str = "") -> str:
        """An empty segment; needs an open case. Without a name it takes the first structure of the
        model's schema that the segmentation lacks (so that it can be exported), else Slicer's default."""
        if self.volume_node is None:
            raise SessionError("open a case first")
        if self.seg_node is None:
            node = self.app.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{self.case_id} segmentation")
            self._activate(node)
        if not name:
            name = next(iter(self._missing_structures()), "")
        return self.editor.add_empty_segment(segment_name=name)

    def _missing_structures(self) -> list[str]:
        from LumbarSegmentLib.slicer import mrml
        from LumbarSegmentLib.registry.packages import PackageError, resolve_model

        try:
            schema = mrml.schema_of_node(self.seg_node) or resolve_model(None, self.registries).schema
        except (PackageError, OSError, ValueError):
            return []
        present = {self.seg_node.GetSegmentation().GetSegment(sid).GetName() for sid in mrml.segment_ids(self.seg_node)}
        return [c.id for c in schema.classes if c.value != 0 and c.id not in present and c.name not in present]

    def remove_segment(self, segment_id: str) -> None:
        """Delete a segment (undoable), e.g. one added by mistake that the export refuses."""
        if self.seg_node is None or segment_id not in self.editor.get_segment_ids():
            raise SessionError(f"no segment {segment_id!r}")
        self.editor.remove_segment(segment_id)

    def rename_segment(self, segment_id: str, name: str) -> None:
        """Give a segment another name (export matches segments to the schema's structures by name)."""
        if self.seg_node is None or segment_id not in self.editor.get_segment_ids():
            raise SessionError(f"no segment {segment_id!r}")
        if not isinstance(name, str) or not name.strip():
            raise SessionError("a segment name cannot be empty")
        self.seg_node.GetSegmentation().GetSegment(segment_id).SetName(name.strip())

    def select_segment(self, segment_id: str) -> None:
        self.editor.set_active_segment_id(segment_id)
        if self.effect != "none" and self.editor.active_effect_name != self._effect_class(self.effect):
            self.set_effect(self.effect)

    @property
    def active_segment(self) -> str:
        return self.editor.get_active_segment_id()

    def set_segment_visible(self, segment_id: str, visible: bool) -> None:
        self.editor.set_segment_visibility(segment_id, bool(visible))

    @staticmethod
    def _effect_class(name: str) -> str:
        return _effect_types()[name].get_effect_name()

    def set_effect(self, name: str):
        """Activate an effect by its short name (``paint``, ``erase``, ``scissors``...)."""
        from trame_slicer.segmentation import BrushDiameterMode

        types = _effect_types()
        if name not in types:
            raise SessionError(f"unknown tool {name!r}; one of {', '.join(types)}")
        if name != "none" and self.seg_node is None:
            raise SessionError("segment the case (or add a segment) before editing")
        effect = self.editor.set_active_effect_type(types[name])
        self.effect = name
        if name in BRUSH_EFFECTS and effect is not None:
            effect.set_brush_diameter(self.brush_mm, BrushDiameterMode.Absolute)  # millimetres, not screen %
        return effect

    def set_brush_mm(self, diameter_mm: float) -> None:
        from trame_slicer.segmentation import BrushDiameterMode

        if not diameter_mm or diameter_mm <= 0:
            raise SessionError("the brush diameter must be positive (millimetres)")
        self.brush_mm = float(diameter_mm)
        effect = self.editor.active_effect
        if self.effect in BRUSH_EFFECTS and effect is not None:
            effect.set_brush_diameter(self.brush_mm, BrushDiameterMode.Absolute)

    def apply_islands(self, action: str = "keep_largest", min_voxels: int = 100) -> None:
        """Islands on the selected segment: keep the largest piece, or remove pieces under ``min_voxels``."""
        effect = self.set_effect("islands")
        if action == "keep_largest":
            effect.keep_largest_island()
        elif action == "remove_small":
            effect.remove_small_islands(int(min_voxels))
        else:
            raise SessionError(f"unknown islands action {action!r}")

    def apply_smoothing(self, kernel_mm: float = 3.0, method: str = "median") -> None:
        """Smooth the selected segment with Slicer's Smoothing effect (median, opening or closing)."""
        effect = self.set_effect("smoothing")
        apply = {"median": effect.apply_median_smoothing, "opening": effect.apply_opening,
                 "closing": effect.apply_closing}.get(method)
        if apply is None:
            raise SessionError(f"unknown smoothing method {method!r}")
        apply(float(kernel_mm), self.active_segment)

    def apply_threshold(self, low: float, high: float) -> None:
        """Fill the selected segment where the image lies within ``[low, high]`` (Threshold effect)."""
        effect = self.set_effect("threshold")
        effect.set_threshold_min_max_values((float(low), float(high)))
        effect.apply()

    def undo(self) -> bool:
        if not self.undo_stack.can_undo():
            return False
        self.undo_stack.undo()
        return True

    def redo(self) -> bool:
        if not self.undo_stack.can_redo():
            return False
        self.undo_stack.redo()
        return True

    # ------------------------------------------------------------------ display
    def auto_window_level(self) -> tuple[float, float]:
        from trame_slicer.core import VolumeWindowLevel

        lo, hi = VolumeWindowLevel.get_volume_auto_min_max_range(self.volume_node)
        window, level = VolumeWindowLevel.min_max_to_window_level(lo, hi)
        self.set_window_level(window, level)
        return window, level

    def set_window_level(self, window: float, level: float) -> None:
        from trame_slicer.core import VolumeWindowLevel

        if self.volume_node is None:
            raise SessionError("open a case first")
        VolumeWindowLevel.set_volume_node_window_level(self.volume_node, float(window), float(level))

    def window_level(self) -> tuple[float, float]:
        dn = self.volume_node.GetDisplayNode() if self.volume_node is not None else None
        return (float(dn.GetWindow()), float(dn.GetLevel())) if dn is not None else (0.0, 0.0)

    def intensity_range(self) -> tuple[float, float]:
        from trame_slicer.core import VolumeWindowLevel

        return VolumeWindowLevel.get_volume_scalar_range(self.volume_node) if self.volume_node else (0.0, 1.0)

    # ------------------------------------------------------------------ export
    def export(self, *, force: bool = False) -> dict:
        """Write the open case as a training case through the Lib; refuses an uncorrected draft unless ``force``.

        Returns ``{"case_id", "version", "json", "edited", "warning"}``; with nothing
        corrected and no ``force``, nothing is written and ``warning`` says why.
        """
        if self.seg_node is None or self.volume_node is None:
            raise SessionError("nothing to export: open a case and segment it first")
        edited = self.edited_segments()
        if not edited and not force:
            return {"case_id": self.case_id, "written": False, "edited": [], "warning": NOTHING_CORRECTED}
        self.save_draft()
        case = self.logic.export(self.volume_node, self.seg_node, self.worklist.dataset, self.case_id)
        return {"case_id": case.case_id, "written": True, "version": case.version, "json": str(case.json_path),
                "edited": list(case.extra.get("edited_structures") or edited),
                "warning": "" if edited else NOTHING_CORRECTED}

    # ------------------------------------------------------------------ retraining
    @property
    def retraining(self) -> bool:
        return self.logic.trainer.running

    def start_retrain(self, base_model: str | None = None, extra_args=()) -> Path:
        """Fine-tune ``base_model`` (default: the model in use) on the exported cases in the work folder."""
        from LumbarSegmentLib.registry.packages import resolve_model

        if not self.worklist.exported_ids():
            raise SessionError("no exported case yet: correct and export at least one case before retraining")
        base = base_model or str(resolve_model(None, self.registries).path)
        run = self.worklist.work / "training" / time.strftime("run-%Y%m%d-%H%M%S")
        self.retrain_run = self.logic.start_retrain(self.worklist.dataset, run, list(extra_args), base_model=base)
        return self.retrain_run

    def poll_retrain(self) -> JobView:
        return JobView.of(self.logic.poll_retrain())

    def stop_retrain(self) -> None:
        self.logic.stop_retrain()

    def resume_retrain(self) -> None:
        """Continue the stopped run from its last checkpoint (the trainer's ``--resume``)."""
        self.logic.resume_retrain()

    def publish_comparison(self) -> dict | None:
        """The publish gate's verdict for the last run: ``{"ref", "default", "reason", "table", "rows"}``.

        Read from the run's JSON-lines progress file (the contract in
        ``LumbarSegmentLib.core.progress``), never scraped from console output.
        """
        if self.retrain_run is None:
            return None
        log = self.retrain_run / "progress.jsonl"
        last = None
        try:
            for line in log.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict) and rec.get("event") == "publish":
                    last = rec
        except OSError:
            return None
        if last is None:
            return None
        comparison = last.get("comparison") or {}
        rows = [{"class": cid, "current": r.get("current"), "candidate": r.get("candidate"), "delta": r.get("delta")}
                for cid, r in (comparison.get("per_class") or {}).items()]
        return {"ref": last.get("ref"), "default": bool(last.get("default")), "reason": last.get("reason", ""),
                "table": last.get("table", ""), "rows": rows}

    # ------------------------------------------------------------------ shutdown
    def close(self) -> None:
        """Stop running jobs (they are child processes) and keep the current draft."""
        if self.segmenting:
            self.cancel_segmentation()
        if self.retraining:
            self.stop_retrain()
        getattr(self.logic.segmenter, "close", lambda: None)()  # ends the warm draft worker
        try:
            self.save_draft()
        except (OSError, ControllerError, RuntimeError):
            pass


__all__ = ["AnnotationSession", "SessionError", "JobView", "EFFECT_NAMES", "NOTHING_CORRECTED"]
