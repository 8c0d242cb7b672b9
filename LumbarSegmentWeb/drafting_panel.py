"""The Segment panel: the model's draft as a background job of the Lib (a child process per job,
progress, Cancel), and the levels of a ``--levels`` draft."""
from __future__ import annotations

from LumbarSegmentLib.slicer.jobs import JobTimeout, wait_for
from LumbarSegmentLib.slicer.logic import CANCELLED, DONE, FAILED, RUNNING, Status

from .advanced import segment_request
from .session_core import SessionCore, SessionError

SEGMENT_MODES = ("fast", "tta", "ensemble")


class DraftingPanel(SessionCore):
    """Start, follow, cancel and finish the segmentation job; rename the levels of its draft."""

    _segmenting_case: str | None = None

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

    def poll_segmentation(self) -> Status:
        """Advance the job; when it has just finished, put its result in the scene."""
        status = self.logic.poll_segmentation()
        if status.state == DONE and self._segmenting_case is not None:
            self._segmenting_case = None
            seg_node, info = self.logic.finish_segmentation()
            self._activate(seg_node)
            self.last_run = self._run_summary(info)
            self.save_draft()
            if info.get("levels"):  # a draft with levels: the table is measured at once (the levels panel's)
                self.measure_levels()
            return Status(DONE, 1.0, info.get("summary", status.message), list(status.warnings))
        if status.state in (FAILED, CANCELLED):
            self._segmenting_case = None
        return status

    def cancel_segmentation(self) -> None:
        self.logic.cancel_segmentation()
        self._segmenting_case = None

    def wait_segmentation(self, timeout: float = 300.0, interval: float = 0.2) -> Status:
        """Block until the job ends (scripts and tests); raises on timeout. The jobs' one poll loop,
        around this panel's poll (which also puts a finished draft into the scene)."""
        try:
            return wait_for(self.poll_segmentation, timeout=timeout, interval=interval,
                            on_timeout=self.cancel_segmentation, finished=lambda st: st.state != RUNNING,
                            what="the segmentation")
        except JobTimeout as exc:
            raise SessionError(str(exc)) from None

    @staticmethod
    def _run_summary(info: dict) -> dict:
        report = info.get("report") or {}
        unc = (report.get("uncertainty") or {}).get("mean_entropy_foreground")
        return {"models": [m.get("ref") for m in report.get("models") or []], "device": report.get("device"),
                "seconds": (report.get("timings_s") or {}).get("total"), "uncertainty": unc,
                "kept": (info.get("update") or {}).get("kept", []),
                "levels": info.get("levels", []), "ordering": report.get("ordering")}  # a --levels run

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
        if self.measured():  # the rows are keyed by level name: measure again under the new names
            self.measure_levels()
        return names
