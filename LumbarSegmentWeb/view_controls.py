"""What a radiologist expects of a slice view beyond the image: where am I, which way is up, and W/L by mouse.

Three small pieces, each on a trame-slicer ``SliceView`` and testable on an offscreen one:

* :func:`slice_readout`: the view's name, the slice number out of the slice count, its
  position in mm along the view's normal (``L 12.0 mm``), and the anatomical direction
  at each edge of the view (``A``/``P``, ``S``/``I``, ``R``/``L``), read from the slice
  node's slice-to-RAS matrix, so they are right for whatever the view shows.
* :func:`step_slice`: move by whole slices, clamped to the volume (arrow keys, Page Up/Down).
* :class:`WindowLevelDrag`: left-drag in a view changes window/level as in 3D Slicer
  (right: wider window, up: higher level), only while no editing tool is active, so a
  Paint stroke never changes the display.
"""
from __future__ import annotations

from typing import Callable

VIEW_COLOURS = {"Sagittal": "#edd54c", "Axial": "#f34a33", "Coronal": "#6eb04b"}  # Slicer's yellow, red, green
_POSITIVE, _NEGATIVE = "RAS", "LPI"


def direction_letter(vector) -> str:
    """The anatomical direction a RAS vector points to most: R/L, A/P or S/I."""
    axis = max(range(3), key=lambda i: abs(vector[i]))
    return (_POSITIVE if vector[axis] >= 0 else _NEGATIVE)[axis]


def _column(matrix, j: int) -> tuple[float, float, float]:
    return tuple(matrix.GetElement(i, j) for i in range(3))


def edge_letters(slice_to_ras) -> dict:
    """``{"left", "right", "top", "bottom"}``: the direction each edge of the view faces."""
    x, y = _column(slice_to_ras, 0), _column(slice_to_ras, 1)
    neg = lambda v: tuple(-c for c in v)  # noqa: E731
    return {"right": direction_letter(x), "left": direction_letter(neg(x)),
            "top": direction_letter(y), "bottom": direction_letter(neg(y))}


def slice_readout(view) -> dict:
    """Name, slice ``index``/``count``, ``position`` text and edge letters of a slice view (plain JSON)."""
    node = view._view_node  # trame-slicer keeps the MRML slice node here; no public getter in 2.0
    matrix = node.GetSliceToRAS()
    lo, hi = view.get_slice_range()
    step = view.get_slice_step() or 1.0
    value = view.get_slice_value()
    count = max(1, int(round((hi - lo) / step)) + 1)
    index = min(count, max(1, int(round((value - lo) / step)) + 1))
    normal = _column(matrix, 2)
    axis = max(range(3), key=lambda i: abs(normal[i]))
    coord = matrix.GetElement(axis, 3)
    letter = (_POSITIVE if coord >= 0 else _NEGATIVE)[axis]
    name = view.get_orientation()
    return {"name": name, "color": VIEW_COLOURS.get(name, "#cccccc"), "index": index, "count": count,
            "position": f"{letter} {abs(coord):.1f} mm", **edge_letters(matrix)}


def step_slice(view, n: int) -> float:
    """Move ``n`` slices (negative: back), never past the first or last; returns the new offset."""
    lo, hi = view.get_slice_range()
    step = view.get_slice_step() or 1.0
    target = min(hi, max(lo, view.get_slice_value() + n * step))
    view.set_slice_value(target)
    return target


class WindowLevelDrag:
    """Left-drag window/level on one view's interactor, as in Slicer, while ``active()`` says so.

    ``get_wl``/``set_wl`` read and write (window, level); ``on_change`` is told the new values
    (the page copies them into its sliders). The gain is the volume's intensity span per view
    width, so a drag across the whole view sweeps the whole range whatever the scanner's units.
    """

    def __init__(self, view, *, active: Callable[[], bool], get_wl: Callable[[], tuple[float, float]],
                 set_wl: Callable[[float, float], None], span: Callable[[], float],
                 on_change: Callable[[float, float], None] | None = None):
        self.view, self.active, self.get_wl, self.set_wl, self.span = view, active, get_wl, set_wl, span
        self.on_change = on_change
        self._start: tuple[int, int, float, float] | None = None
        it = view.interactor()
        self._tags = [it.AddObserver("LeftButtonPressEvent", self._press, 1.0),
                      it.AddObserver("MouseMoveEvent", self._move, 1.0),
                      it.AddObserver("LeftButtonReleaseEvent", self._release, 1.0)]

    def _press(self, interactor, _event) -> None:
        if not self.active():
            self._start = None
            return
        x, y = interactor.GetEventPosition()
        window, level = self.get_wl()
        self._start = (x, y, window, level)

    def _move(self, interactor, _event) -> None:
        if self._start is None:
            return
        x0, y0, window0, level0 = self._start
        x, y = interactor.GetEventPosition()
        width, height = self.view.render_window().GetSize()
        gain = max(self.span(), 1e-6) / max(width, height, 1)
        window = max(1.0, window0 + (x - x0) * gain)
        level = level0 + (y - y0) * gain
        self.set_wl(window, level)
        if self.on_change is not None:
            self.on_change(window, level)

    def _release(self, _interactor, _event) -> None:
        self._start = None

    def detach(self) -> None:
        it = self.view.interactor()
        for tag in self._tags:
            it.RemoveObserver(tag)
        self._tags = []


__all__ = ["slice_readout", "step_slice", "mr_presets", "edge_letters", "direction_letter", "WindowLevelDrag", "VIEW_COLOURS"]


def mr_presets(auto: tuple[float, float], full_range: tuple[float, float]) -> dict[str, tuple[float, float]]:
    """Window/level presets for MR, whose intensities have no fixed scale (unlike CT's Hounsfield units).

    So each preset is relative to the open volume: ``auto`` is the (window, level) of its robust
    intensity range, ``full_range`` its (min, max).
    """
    window, level = auto
    lo, hi = full_range
    return {"Auto": (window, level), "Full range": (max(1.0, hi - lo), (hi + lo) / 2),
            "High contrast": (max(1.0, window / 2), level), "Low contrast": (max(1.0, window * 2), level),
            "Brighter": (max(1.0, window), level - window / 4), "Darker": (max(1.0, window), level + window / 4)}
