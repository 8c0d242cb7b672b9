"""The Edit panel: segments (add, remove, rename, show, select), trame-slicer's ports of Slicer's
segment-editor effects on the open segmentation, and undo/redo."""
from __future__ import annotations

from .session_core import SessionCore, SessionError

BRUSH_EFFECTS = ("paint", "erase")
EFFECT_NAMES = ("none", "paint", "erase", "scissors", "draw", "islands", "smoothing", "threshold")


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


class EditingPanel(SessionCore):
    """Segments and the effects that edit them."""

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
        from LumbarSegmentLib.registry.package import PackageError
        from LumbarSegmentLib.registry.catalog import resolve_model

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
