"""What every panel of the annotation session shares: the error it raises, the open
case's state, and the draft that keeps it (saved to ``<work>/drafts`` after every change that matters).

The panels (:mod:`.cases_panel`, :mod:`.drafting_panel`, :mod:`.editing_panel`, :mod:`.training_panel`)
are mixins over :class:`SessionCore`; :class:`.session.AnnotationSession` puts them together.
"""
from __future__ import annotations

import time
from pathlib import Path

from LumbarSegmentLib.slicer.logic import ModuleLogic

from .worklist import Worklist


class SessionError(RuntimeError):
    """An action the current state does not allow (no case loaded, a job running...)."""


class SessionCore:
    """The state the panels share (set up by :class:`.session.AnnotationSession`), and the draft."""

    worklist: Worklist
    app: object  # trame_slicer.core.SlicerApp
    editor: object  # the app's segmentation editor
    undo_stack: object
    logic: ModuleLogic
    registries: object
    device: str
    threads: int | None
    case_id: str | None
    volume_node: object
    seg_node: object
    fingerprint: str | None
    brush_mm: float
    effect: str
    last_run: dict
    retrain_run: Path | None

    def _activate(self, seg_node) -> None:
        """Make ``seg_node`` the one the effects edit, shown as filled 2D outlines."""
        self.seg_node = seg_node
        if seg_node.GetDisplayNode() is None:
            seg_node.CreateDefaultDisplayNodes()
        self.editor.set_active_segmentation(seg_node, self.volume_node)
        self.editor.set_surface_representation_enabled(False)
        self.logic.watch(seg_node, self.volume_node)  # brush strokes and other edits count as active time
        if self.effect != "none":
            self.set_effect(self.effect)  # the editing panel's

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
                "image_sha256": self.fingerprint, "effort": self.logic.clicks.effort(self.seg_node),
                "effort_state": self.logic.effort.state(self.seg_node)}  # the draft the hand edits count from
        self.worklist.write_info(self.case_id, info)
        return path
