"""One annotator's session without a web server: scene, jobs, effects, undo, export, retraining.

The page (:mod:`.app`) only binds buttons to these methods and shows what they return,
so everything an annotator can do is testable in plain pytest: the API-level tests
build a session with an offscreen slice view and drive Paint/Erase with interactor
events, exactly like the browser's mouse does through trame-slicer's remote view.

One mixin per panel of the page holds that panel's actions, over the state they share
(:class:`.session_core.SessionCore`): cases and display (:mod:`.cases_panel`), the model's
draft and its levels (:mod:`.drafting_panel`), the levels table and its CSV (:mod:`.levels_panel`),
segments and effects (:mod:`.editing_panel`), click to fix (:mod:`.click_panel`), export and
retraining (:mod:`.training_panel`).

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

from pathlib import Path

from LumbarSegmentLib.slicer.logic import ControllerError, ModuleLogic

from .cases_panel import CasesPanel
from .click_panel import ClickPanel
from .drafting_panel import DraftingPanel
from .editing_panel import EditingPanel
from .levels_panel import LevelsPanel
from .training_panel import TrainingPanel
from .worklist import Worklist


class AnnotationSession(CasesPanel, DraftingPanel, LevelsPanel, EditingPanel, ClickPanel, TrainingPanel):
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
