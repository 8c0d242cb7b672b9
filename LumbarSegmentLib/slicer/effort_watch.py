"""The effort ledger's hand side: the draft each segmentation started from, and the annotator's active time.

The clicks count themselves (``click_tool``); what the annotator does with the Segment Editor's
brushes, erasers, scissors and the rest does not pass through this package, so it is measured in
two other ways:

* **Voxels painted and erased** are found at export by comparing the exported label map with the
  draft the model produced (:func:`effort.hand_edits`), minus the voxels a click changed. The
  draft is kept here per segmentation node: handed over by the logic when it builds a node from a
  model run, or taken from a drafted node that is still exactly as the model left it when this
  watch first sees it. A segmentation nobody drafted is compared with an empty map (everything in
  it was painted). A drafted segmentation whose draft is unknown (edited, then saved and reopened)
  records no effort rather than a wrong one.
* **Active time**: an observer on each watched segmentation node touches the ledger whenever a
  segment's voxels, a segment, or the list of segments changes - whichever front end made the
  change, Slicer's Segment Editor or the browser's tools. Pauses longer than ``effort.IDLE_S`` are
  not counted. Changes the tools make themselves (a click, a model draft) are not an annotator's
  action and are skipped; a click stamps its own time.

The clock is the click tool's (``ClickTool.clock``), so a test sets one clock for both.
"""
from __future__ import annotations

import base64
import contextlib
import zlib

import numpy as np

from LumbarSegmentLib.formats.segfile import DRAFT_HASH_TAG
from LumbarSegmentLib.slicer.bridge import DRAFTED_ATTR, get_tag, segment_ids
from LumbarSegmentLib.slicer.click_tool import ClickTool

EVENTS = ("SourceRepresentationModified", "SegmentAdded", "SegmentRemoved", "SegmentModified")


class EffortWatch:
    """Drafts and observers per segmentation node; computes the effort record of an export."""

    def __init__(self, clicks: ClickTool):
        self.clicks = clicks
        clicks.on_start = self.watch
        self._drafts: dict[str, np.ndarray] = {}
        self._observers: dict[str, tuple[object, list[int]]] = {}
        self._quiet = 0

    @contextlib.contextmanager
    def quiet(self):
        """Changes made inside are the tools' own, not the annotator's: no active time for them."""
        self._quiet += 1
        try:
            yield
        finally:
            self._quiet -= 1

    # --- drafts -----------------------------------------------------------------------------
    def remember_draft(self, seg_node, labels) -> None:
        """``labels`` (on the volume's grid, in the node's schema values) is what the model drafted."""
        self._drafts[seg_node.GetID()] = np.array(labels, dtype=np.uint8, copy=True)

    def draft(self, seg_node) -> np.ndarray | None:
        return self._drafts.get(seg_node.GetID()) if seg_node is not None else None

    def forget(self, seg_node) -> None:
        """Stop watching a node that leaves the scene (its draft goes too)."""
        node, tags = self._observers.pop(seg_node.GetID(), (None, []))
        for tag in tags:
            node.RemoveObserver(tag)
        self._drafts.pop(seg_node.GetID(), None)

    # --- watching ---------------------------------------------------------------------------
    def watch(self, seg_node, volume_node=None) -> None:
        """Count the annotator's changes to ``seg_node`` as active time (once per node; again is harmless).

        A drafted node that is still its untouched draft gives its draft here, if none is known yet."""
        import slicer

        if seg_node is None:
            return
        sid = seg_node.GetID()
        if sid not in self._observers:
            tags = [seg_node.AddObserver(getattr(slicer.vtkSegmentation, e), self._changed) for e in EVENTS]
            self._observers[sid] = (seg_node, tags)
        if sid not in self._drafts and volume_node is not None:
            pristine = _pristine_labels(self.clicks.scene, self.clicks.seg_logic, seg_node, volume_node)
            if pristine is not None:
                self._drafts[sid] = pristine

    def _changed(self, seg_node, _event) -> None:
        if self._quiet or self.clicks.applying:
            return
        self.clicks.ledger(seg_node, create=True).touch(self.clicks.clock())

    # --- the export's record ----------------------------------------------------------------
    def record(self, seg_node, labels: np.ndarray, drafted: bool) -> dict | None:
        """The effort to record with an export whose label map is ``labels``: the ledger with its hand counts
        set. When ``seg_node`` was drafted by a model whose draft is not known here: the clicks and the time
        with the hand counts ``None`` (unknown), or ``None`` when nothing was counted at all."""
        draft = self.draft(seg_node)
        if draft is None or draft.shape != labels.shape:
            if drafted:  # the clicks and the time are known, the hand edits are not: said, not guessed
                ledger = self.clicks.ledger(seg_node, create=False)
                if ledger is None or not (ledger.clicks or ledger.active_seconds):
                    return None
                return {**ledger.to_dict(), "voxels_painted": None, "voxels_erased": None}
            draft = np.zeros(labels.shape, np.uint8)  # annotated from scratch: everything was painted
        ledger = self.clicks.ledger(seg_node, create=True)
        ledger.set_hand_edits(draft, labels, self.clicks.clicked(seg_node))
        self.clicks.keep(seg_node)
        return ledger.to_dict()

    # --- saving with a draft file (the browser page) ----------------------------------------
    def state(self, seg_node) -> dict | None:
        """The draft and the clicked-voxel mask of ``seg_node``, packed for a JSON file (``None``: no draft)."""
        draft = self.draft(seg_node)
        if draft is None:
            return None
        clicked = self.clicks.clicked(seg_node)
        out = {"shape": list(draft.shape), "draft": _pack(draft)}
        if clicked is not None and clicked.shape == draft.shape:
            out["clicked"] = _pack(np.packbits(clicked.ravel()))
        return out

    def restore(self, seg_node, state) -> bool:
        """Put back what :meth:`state` packed; False (nothing changed) when it does not fit or is damaged."""
        try:
            shape = tuple(int(n) for n in state["shape"])
            draft = np.frombuffer(_unpack(state["draft"]), np.uint8).reshape(shape)
            clicked = None
            if "clicked" in state:
                bits = np.frombuffer(_unpack(state["clicked"]), np.uint8)
                clicked = np.unpackbits(bits, count=int(np.prod(shape))).reshape(shape).astype(bool)
        except (KeyError, TypeError, ValueError, zlib.error):
            return False
        self._drafts[seg_node.GetID()] = draft.copy()
        if clicked is not None:
            self.clicks.restore_clicked(seg_node, clicked)
        return True


def was_drafted(seg_node) -> bool:
    """Whether a model (or a label map loaded as a draft) made this segmentation: the node lists drafted
    segments, or a segment carries its draft's hash (what a reloaded ``.seg.nrrd`` keeps)."""
    if seg_node.GetAttribute(DRAFTED_ATTR):
        return True
    seg = seg_node.GetSegmentation()
    return any(get_tag(seg.GetSegment(sid), DRAFT_HASH_TAG) for sid in segment_ids(seg_node))


def _pristine_labels(scene, seg_logic, seg_node, volume_node) -> np.ndarray | None:
    """The node's label map when a model drafted it and no segment has changed since, else ``None``."""
    from LumbarSegmentLib.slicer.drafts import edited_segments, schema_of_node
    from LumbarSegmentLib.slicer.export import segmentation_to_labels

    schema = schema_of_node(seg_node)
    if schema is None or not was_drafted(seg_node):
        return None
    try:
        if edited_segments(seg_node, schema, volume_node):
            return None
        return segmentation_to_labels(scene, seg_logic, seg_node, volume_node, schema).array.copy()
    except Exception:  # noqa: BLE001 - a segment the schema does not know: the draft stays unknown
        return None


def _pack(array: np.ndarray) -> str:
    return base64.b64encode(zlib.compress(np.ascontiguousarray(array).tobytes(), 6)).decode("ascii")


def _unpack(text: str) -> bytes:
    return zlib.decompress(base64.b64decode(text.encode("ascii"), validate=True))
