"""Click to fix in the browser: the session's side (the page's buttons and view clicks land here).

The work is the Lib's (``ModuleLogic.clicks``, a ``click_tool.ClickTool``: the same tool, checks and
effort ledger as the Slicer panel), so a case exported from the page records its clicks exactly as one
exported from Slicer. This mixin only ties it to the open case:

* the model stays warm while the case is open and is dropped when another case opens
  (:meth:`.cases_panel.CasesPanel.load_case`); a click on a segmentation that replaced the first one
  (a new draft) starts the tool again on it;
* the structure is the selected segment's, the sign ``"+"`` or ``"-"``; anything else the page sends
  is refused with a message, before the model runs;
* the ledger travels with the draft file (:meth:`.session_core.SessionCore.save_draft`) and comes back
  when the case is opened again.
"""
from __future__ import annotations

from LumbarSegmentLib.slicer.click_tool import ClickToolError

from .session_core import SessionCore, SessionError


class ClickPanel(SessionCore):
    """Switch click to fix on and off, click in a slice view, undo a click, read the ledger."""

    _click_model: str | None = None

    @property
    def clicking(self) -> bool:
        return self.logic.clicks.active

    def start_clicks(self, model: str | None = None) -> list[str]:
        """Load ``model`` (an offered package folder; ``None``: the default) for the open case; returns the
        structures a click may fix. The brush and the other effects are put down: a click is a click."""
        if self.volume_node is None or self.seg_node is None:
            raise SessionError("click to fix needs a segmentation: open a case and segment it (or load its draft)")
        if self.segmenting:
            raise SessionError("a segmentation is running: wait for it before clicking to fix")
        self.set_effect("none")
        try:
            structures = self.logic.clicks.start(self.volume_node, self.seg_node, model)
        except (ClickToolError, OSError, ValueError) as exc:
            raise SessionError(str(exc)) from None
        self._click_model = model
        return structures

    def stop_clicks(self) -> None:
        self.logic.clicks.stop()

    def click_in_view(self, view, x: float, y: float, sign) -> int:
        """A click at pixel ``x, y`` of a slice view: the selected segment's structure, ``sign`` ``"+"`` or ``"-"``
        (a boolean from the server's own code); returns the voxels changed."""
        positive = self.logic.clicks.check_sign(sign)  # refuses a forged sign before anything runs
        if self.volume_node is None or self.seg_node is None:
            raise SessionError("open a case with a segmentation first")
        if self.logic.clicks.fix is None or self.logic.clicks.fix.seg_node is not self.seg_node:
            self.start_clicks(self._click_model)  # the segmentation was replaced since the tool started
        node = view.get_view_node()
        if node is None or not hasattr(node, "GetXYToRAS"):
            raise SessionError("click to fix works in the slice views (sagittal, axial, coronal)")
        return self.logic.clicks.click_in_view(node.GetXYToRAS(), x, y, self.active_segment, positive)

    def undo_click(self) -> bool:
        return self.logic.clicks.undo()

    def click_effort(self) -> dict:
        """What the page shows: the ledger's counts, and the clicks Undo click can still take back."""
        tool = self.logic.clicks
        effort = tool.effort(self.seg_node) or {"clicks": 0, "voxels_by_clicks": 0}
        undoable = tool.clicks_in_history if tool.fix is not None and tool.fix.seg_node is self.seg_node else 0
        return {"clicks": int(effort["clicks"]), "voxels_by_clicks": int(effort["voxels_by_clicks"]),
                "undoable": undoable}
