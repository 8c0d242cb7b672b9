""""Click to fix" on a segmentation node: the logic behind the Slicer module's and the browser's tool.

One :class:`ClickToFix` per (volume, segmentation) keeps the model warm (a ``refine.RefineSession``:
the probabilities of a slice are computed once, the first time a click reaches it). Each click is
applied to the segmentation as it is now - the annotator's brush work included - and only the
segments whose voxels changed are replaced, each with an undo step. Segments of other structures
that the annotator edited by hand are protected: a click never changes their voxels. Every click
is entered in the case's effort ledger (``effort.EffortLedger``), which the export records, and the
voxels it changed join :attr:`ClickToFix.changed`, so that the export does not count them again as
hand edits.

The tool keeps the case's click history: every click hands the session all the clicks so far plus
the new one, with only the new one editing the labels (``new=1``). Rules ignore the older clicks;
a guidance model needs them all to know what the annotator has already said. Undo takes the
last click out of the history as well as out of the segmentation.

Like every MRML function here it takes the scene and the logics as arguments, so it is tested on a
real scene (slicer-core) without the Qt application.
"""
from __future__ import annotations

import time

import numpy as np

from LumbarSegmentLib.dataset.effort import EffortLedger
from LumbarSegmentLib.slicer.bridge import MRMLError, node_to_volume, set_segment_mask
from LumbarSegmentLib.slicer.drafts import edited_segments, segment_classes
from LumbarSegmentLib.slicer.export import segmentation_to_labels
from LumbarSegmentLib.inference.refine import Click, RefineSession


class ClickToFix:
    def __init__(self, scene, seg_logic, volume_node, seg_node, model, options=None, ledger: EffortLedger | None = None,
                 changed: np.ndarray | None = None):
        self.scene, self.seg_logic, self.volume_node, self.seg_node = scene, seg_logic, volume_node, seg_node
        self.volume = node_to_volume(volume_node, apply_transform=False)  # the frame the segmentation lives in
        self.session = RefineSession(self.volume, model, options)
        self.schema = self.session.schema
        self.ledger = ledger or EffortLedger()
        self.history: list[Click] = []  # every click of this case still in force, oldest first
        self._undo: list[list[tuple[str, np.ndarray]]] = []  # one entry per click of the history
        # Voxels some click in force changed (shared with the click tool, so it outlives this tool), and
        # per click the flat indices it added to that mask: undo takes them out again.
        self.changed = changed if changed is not None and changed.shape == self.volume.shape \
            else np.zeros(self.volume.shape, dtype=bool)
        self._added: list[np.ndarray] = []

    def _segment_of(self) -> dict[str, str]:
        return {cls.id: sid for sid, cls in segment_classes(self.seg_node, self.schema).items()}

    def click(self, point_lps, structure: str, positive: bool, now: float | None = None) -> int:
        """Apply one click (``point_lps``: millimetres in the volume's own frame, before any parent
        transform); returns the number of voxels changed (0: nothing to do there)."""
        click = Click(tuple(float(v) for v in point_lps), structure, bool(positive))
        labels = segmentation_to_labels(self.scene, self.seg_logic, self.seg_node, self.volume_node, self.schema).array
        hand = set(edited_segments(self.seg_node, self.schema, self.volume_node)) - {structure}
        protect = np.isin(labels, [self.schema[c].value for c in hand if c in self.schema])
        result = self.session.refine(labels, [*self.history, click], protect=protect, new=1)
        self.ledger.add_click(result.changed_voxels)
        self.ledger.touch(time.monotonic() if now is None else now)
        self.history.append(click)
        step: list[tuple[str, np.ndarray]] = []
        self._undo.append(step)  # also for a click that changed nothing: undo must drop it from the history
        added = np.flatnonzero((result.labels != labels) & ~self.changed)
        self.changed.flat[added] = True
        self._added.append(added)
        if not result.changed_voxels:
            return 0
        segments = self._segment_of()
        for cls in self.schema.foreground:
            before, after = labels == cls.value, result.labels == cls.value
            if np.array_equal(before, after):
                continue
            sid = segments.get(cls.id)
            if sid is None:
                sid = self.seg_node.GetSegmentation().AddEmptySegment(cls.id, cls.name, list(cls.color_float))
            step.append((sid, before))
            set_segment_mask(self.seg_logic, self.seg_node, sid, after, self.volume_node)
        return result.changed_voxels

    def undo(self) -> bool:
        """Take back the last click (its voxels and its place in the history); False when there is none.

        The ledger keeps counting it: the click was effort spent, whether or not it stayed."""
        if not self._undo:
            return False
        step = self._undo[-1]
        for sid, _mask in step:
            if self.seg_node.GetSegmentation().GetSegment(sid) is None:
                raise MRMLError(f"segment {sid!r} was deleted since the click; nothing was undone")
        for sid, mask in step:
            set_segment_mask(self.seg_logic, self.seg_node, sid, mask, self.volume_node)
        self._undo.pop()
        self.history.pop()
        self.changed.flat[self._added.pop()] = False
        return True
