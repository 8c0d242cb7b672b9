"""Click to fix as the two front ends drive it: one warm tool per open case, strict checks, the ledger.

The Slicer panel and the browser page both hand their clicks to a :class:`ClickTool` owned by the
module logic (``logic.ModuleLogic.clicks``), so the two behave alike and export alike:

* :meth:`ClickTool.start` opens a :class:`refine.ClickToFix` for a volume and its segmentation, with
  the chosen model loaded once; starting it again for the same nodes and model keeps it (and its
  click history), another case or model replaces it.
* Every value that reaches :meth:`ClickTool.click` is checked before anything runs: the structure
  must be one of the model's foreground class ids, the sign a real boolean or ``"+"``/``"-"``, the
  point three finite numbers. The browser's messages are untrusted, and a friendly refusal is
  cheaper than a half-applied click.
* The effort ledger lives per segmentation node: in memory while the tool runs, and copied onto the
  node as an attribute after every click, so a saved scene keeps it. ``ModuleLogic.export`` records
  :meth:`ClickTool.effort` with the case; the page saves it with its draft and puts it back with
  :meth:`ClickTool.restore`. Next to it the tool keeps the mask of voxels the clicks changed
  (:meth:`ClickTool.clicked`), which the export leaves out of the hand edits.
* ``clock`` (seconds, monotonic) stamps the clicks that come without a time; tests replace it.

:func:`view_xy_to_lps` turns a click in a slice view (its XY-to-RAS matrix and the pixel) into the
point the tool wants: LPS millimetres in the volume's own frame (parent transform taken off).
No Qt here: the Qt shell only reads the mouse and the selected segment.
"""
from __future__ import annotations

import json
import math
import time
from typing import Callable

import numpy as np

from LumbarSegmentLib.dataset.effort import EffortLedger
from LumbarSegmentLib.slicer.bridge import ATTR_PREFIX, MRMLError
from LumbarSegmentLib.slicer.drafts import segment_classes

EFFORT_ATTR = ATTR_PREFIX + "Effort"
SIGNS = {"+": True, "-": False}


class ClickToolError(ValueError):
    """A click the tool cannot take: no case open, an unknown structure or sign, a malformed point."""


class ClickTool:
    """One :class:`refine.ClickToFix` at a time, and the effort ledgers of the segmentations clicked on."""

    def __init__(self, scene, seg_logic, registries=None, clock: Callable[[], float] = time.monotonic):
        self.scene, self.seg_logic, self.registries = scene, seg_logic, registries
        self.clock = clock
        self.fix = None  # the warm refine.ClickToFix of the open case
        self.applying = False  # True while a click or an undo writes into the segmentation
        self._key: tuple | None = None
        self._ledgers: dict[str, EffortLedger] = {}
        self._clicked: dict[str, np.ndarray] = {}
        # Called with (segmentation, volume) before the first click on a segmentation: the effort watch
        # learns its draft there, before a click changes it.
        self.on_start: Callable | None = None

    @property
    def active(self) -> bool:
        return self.fix is not None

    def start(self, volume_node, seg_node, model=None) -> list[str]:
        """Get ready to click on ``seg_node`` over ``volume_node`` with ``model`` (a package folder, a ref,
        a loaded package; ``None``: the click-guided model of the registries, else the default model; a drafting
        model: the click-guided model trained from it when the registries hold one); returns the structures a
        click may name."""
        from LumbarSegmentLib.registry.catalog import corrector_for, resolve_model, resolve_refine_model
        from LumbarSegmentLib.slicer.refine import ClickToFix

        if volume_node is None or seg_node is None:
            raise ClickToolError("open a case and draft (or load) its segmentation before clicking to fix")
        key = (volume_node.GetID(), seg_node.GetID(), model if isinstance(model, (str, type(None))) else id(model))
        if self.fix is None or key != self._key:
            if self.on_start is not None:
                self.on_start(seg_node, volume_node)
            if hasattr(model, "schema"):
                package = model
            elif model is None:
                package = resolve_refine_model(None, self.registries)
            else:  # the drafting model picked in the panel: its click-guided model when one was made from it
                package = corrector_for(resolve_model(model, self.registries), self.registries)
            self.fix = ClickToFix(self.scene, self.seg_logic, volume_node, seg_node, package,
                                  ledger=self.ledger(seg_node, create=True), changed=self._clicked.get(seg_node.GetID()))
            self._clicked[seg_node.GetID()] = self.fix.changed
            self._key = key
        return self.structures()

    def stop(self) -> None:
        """Drop the warm model (another case opens, or the tool is switched off); the ledgers stay."""
        self.fix, self._key = None, None

    def structures(self) -> list[str]:
        return [c.id for c in self.fix.schema.foreground] if self.fix is not None else []

    def check_structure(self, structure) -> str:
        """``structure`` when it is one of the model's foreground class ids; else a refusal naming them."""
        allowed = self.structures()
        if not isinstance(structure, str) or structure not in allowed:
            shown = repr(structure)[:40]
            raise ClickToolError(f"click to fix: {shown} is not a structure the model labels; choose one of "
                                 f"{', '.join(allowed) or 'its structures (start the tool first)'}")
        return structure

    @staticmethod
    def check_sign(sign) -> bool:
        """``True`` (positive: "this is it") or ``False`` (negative); only booleans and ``"+"``/``"-"`` pass."""
        if isinstance(sign, bool):
            return sign
        if isinstance(sign, str) and sign in SIGNS:
            return SIGNS[sign]
        raise ClickToolError(f"click to fix: the sign {repr(sign)[:20]} is not + (this is the structure) "
                             f"or - (it is not)")

    def structure_of_segment(self, seg_node, segment_id) -> str:
        """The class id a segment stands for (by its name, as the export matches it), if the model labels it."""
        if self.fix is None:
            raise ClickToolError("click to fix is not on")
        classes = segment_classes(seg_node, self.fix.schema)
        if not isinstance(segment_id, str) or segment_id not in classes:
            raise ClickToolError(f"click to fix: select a segment of one of {', '.join(self.structures())} "
                                 f"first (the selected segment chooses what a click fixes)")
        return self.check_structure(classes[segment_id].id)

    def click(self, point_lps, structure, positive, now: float | None = None) -> int:
        """One checked click on the open case; returns the voxels changed (0: nothing to do there)."""
        if self.fix is None:
            raise ClickToolError("click to fix is not on: switch it on for the open case first")
        structure, positive = self.check_structure(structure), self.check_sign(positive)
        try:
            point = tuple(float(v) for v in point_lps)
        except (TypeError, ValueError):
            raise ClickToolError("click to fix: the point must be three numbers (LPS millimetres)") from None
        if len(point) != 3 or not all(math.isfinite(v) for v in point):
            raise ClickToolError("click to fix: the point must be three finite numbers (LPS millimetres)")
        self.applying = True
        try:
            changed = self.fix.click(point, structure, positive, now=self.clock() if now is None else now)
        finally:
            self.applying = False
        self.keep(self.fix.seg_node)
        return changed

    def click_in_view(self, xy_to_ras, x: float, y: float, segment_id, positive, now: float | None = None) -> int:
        """A click in a slice view (what both front ends receive): pixel ``x, y`` of a view whose slice node
        has ``xy_to_ras``; ``segment_id``, the selected segment, chooses the structure."""
        if self.fix is None:
            raise ClickToolError("click to fix is not on: switch it on for the open case first")
        structure = self.structure_of_segment(self.fix.seg_node, segment_id)
        positive = self.check_sign(positive)
        return self.click(view_xy_to_lps(xy_to_ras, x, y, self.fix.volume_node), structure, positive, now=now)

    def undo(self) -> bool:
        """Take back the open case's last click; False when there is none."""
        if self.fix is None:
            return False
        self.applying = True
        try:
            if not self.fix.undo():
                return False
        finally:
            self.applying = False
        self.ledger(self.fix.seg_node, create=True).touch(self.clock())
        self.keep(self.fix.seg_node)
        return True

    @property
    def clicks_in_history(self) -> int:
        return len(self.fix.history) if self.fix is not None else 0

    # --- the ledger ------------------------------------------------------------------------
    def ledger(self, seg_node, create: bool = False) -> EffortLedger | None:
        """The segmentation's ledger: the one in memory, else the one saved on the node, else new or None."""
        if seg_node is None:
            return None
        found = self._ledgers.get(seg_node.GetID())
        if found is None:
            saved = seg_node.GetAttribute(EFFORT_ATTR)
            if saved:
                try:
                    found = EffortLedger.from_dict(json.loads(saved))
                except (ValueError, TypeError):
                    found = None  # a damaged record: start again rather than refuse to click
            if found is None and create:
                found = EffortLedger()
            if found is not None:
                self._ledgers[seg_node.GetID()] = found
        return found

    def clicked(self, seg_node) -> np.ndarray | None:
        """The voxels of ``seg_node`` that clicks still in force changed (``None``: never clicked on here)."""
        return self._clicked.get(seg_node.GetID()) if seg_node is not None else None

    def restore_clicked(self, seg_node, mask: np.ndarray) -> None:
        self._clicked[seg_node.GetID()] = np.asarray(mask, dtype=bool)

    def effort(self, seg_node) -> dict | None:
        """What the export records (``None``: no click was ever made on this segmentation)."""
        led = self.ledger(seg_node)
        return led.to_dict() if led is not None else None

    def restore(self, seg_node, data) -> None:
        """Put back a ledger saved elsewhere (the page's draft file) on a freshly loaded segmentation."""
        if seg_node is None or not isinstance(data, dict):
            return
        self._ledgers[seg_node.GetID()] = EffortLedger.from_dict(data)
        self.keep(seg_node)

    def keep(self, seg_node) -> None:
        """Copy the ledger onto the node (a saved scene keeps it)."""
        led = self._ledgers.get(seg_node.GetID())
        if led is not None:
            seg_node.SetAttribute(EFFORT_ATTR, json.dumps(led.to_dict()))


def view_xy_to_lps(xy_to_ras, x: float, y: float, volume_node) -> tuple[float, float, float]:
    """A pixel of a slice view as LPS millimetres in ``volume_node``'s own frame.

    ``xy_to_ras``: the slice node's ``GetXYToRAS()`` (a vtkMatrix4x4 or a 4x4 array); the pixel is in
    the view's XY (VTK display) coordinates. The click lands in world RAS; a linear parent transform of
    the volume is taken off so that the point is where the segmentation's voxels are.
    """
    m = np.array([[xy_to_ras.GetElement(r, c) for c in range(4)] for r in range(4)]) \
        if hasattr(xy_to_ras, "GetElement") else np.asarray(xy_to_ras, dtype=float)
    ras = m @ np.array([float(x), float(y), 0.0, 1.0])
    tnode = volume_node.GetParentTransformNode() if volume_node is not None else None
    if tnode is not None:
        if not tnode.IsTransformToWorldLinear():
            raise MRMLError(f"{volume_node.GetName()} is under a non-linear transform ({tnode.GetName()}); harden "
                            f"the transform (Transforms module) before clicking to fix")
        import vtk

        to_world = vtk.vtkMatrix4x4()
        tnode.GetMatrixTransformToWorld(to_world)
        t = np.array([[to_world.GetElement(r, c) for c in range(4)] for r in range(4)])
        ras = np.linalg.solve(t, ras)
    return (-float(ras[0]), -float(ras[1]), float(ras[2]))
