"""Click to fix on the page: the switch, the +/- choice, Undo click, and the clicks in the slice views.

A mixin of :class:`.app.LumbarSegmentPage`. A left click in a slice view reaches the server as an
interactor event of that view (trame-slicer's remote view forwards the browser's mouse), like the
Paint strokes and the window/level drag; :class:`ViewClicks` catches the press while the tool is on,
ahead of the view's own handling, and hands the pixel to the session (:mod:`.click_panel`), which maps
it to the volume and applies the click. Shift (or Ctrl) with the click turns the chosen sign round.

State keys: ``click_mode`` (on/off), ``click_sign`` (``"+"`` or ``"-"``; checked again on every click,
since a client may set any value), ``click_effort`` (clicks counted, voxels they changed, clicks Undo
click can take back); what a click did goes to the drawer's ``message`` line. The controls share the
line of Add segment under the segment list (the selected segment is what a click fixes), so that the
page still shows everything at a desktop size.
"""
from __future__ import annotations

from typing import Callable

from trame.widgets import html
from trame.widgets import vuetify3 as v3

from .page_layout import tid


class ViewClicks:
    """Left presses on one slice view's interactor, taken (and kept from the view) while ``active()``."""

    PRIORITY = 2.0  # ahead of the effects' and the window/level drag's observers

    def __init__(self, view, *, active: Callable[[], bool], on_click: Callable[[object, int, int, bool], None]):
        self.view, self.active, self.on_click = view, active, on_click
        self._tag = view.interactor().AddObserver("LeftButtonPressEvent", self._press, self.PRIORITY)

    def _press(self, interactor, _event) -> None:
        if not self.active():
            return
        x, y = interactor.GetEventPosition()
        inverted = bool(interactor.GetShiftKey() or interactor.GetControlKey())
        interactor.GetCommand(self._tag).SetAbortFlag(1)
        self.on_click(self.view, x, y, inverted)

    def detach(self) -> None:
        self.view.interactor().RemoveObserver(self._tag)


class ClickControls:
    """The page's click-to-fix handlers and widgets (mixed into the page, which has ``state`` and ``session``)."""

    def _init_click_state(self) -> None:
        self._view_clicks: list[ViewClicks] = []
        self.state.update({"click_mode": False, "click_sign": "+",
                           "click_effort": {"clicks": 0, "voxels_by_clicks": 0, "undoable": 0}})

    def clicks_on(self) -> bool:
        return bool(self.state.click_mode) and self.session.effect == "none"

    def _watch_clicks(self, view) -> None:
        self._view_clicks.append(ViewClicks(view, active=self.clicks_on, on_click=self._on_view_click))

    def _reset_clicks(self) -> None:
        """Another case is open: the tool is off and the counts are that case's."""
        self.state.click_mode = False
        self.state.click_effort = self.session.click_effort()

    def toggle_clicks(self, on) -> None:
        if on is not True:
            self.session.stop_clicks()
            self.state.click_mode = False
            return
        structures = self._guard(lambda: self.session.start_clicks(self.session.offered_model(self.state.model)))
        self.state.click_mode = structures is not None
        if structures is not None:
            self.state.effect = "none"
            self.state.message = (f"select the segment to fix ({', '.join(structures)}), then click in a "
                                        f"slice view: + adds it there, - removes it (Shift+click: the other sign)")

    def set_click_sign(self, sign) -> None:
        if self._guard(self.session.logic.clicks.check_sign, sign) is None and self.state.error:
            self.state.click_sign = "+"
        else:
            self.state.click_sign = sign

    def _on_view_click(self, view, x: int, y: int, inverted: bool) -> None:
        with self.state:
            sign = self.state.click_sign
            if inverted and sign in ("+", "-"):
                sign = "-" if sign == "+" else "+"
            changed = self._guard(self.session.click_in_view, view, x, y, sign)
            if changed is not None:
                self.state.message = (f"{'added' if sign == '+' else 'removed'}: {changed} voxels changed"
                                            if changed else "nothing to change there")
            self.state.click_effort = self.session.click_effort()
            self.refresh_segments()

    def undo_click(self) -> None:
        undone = self._guard(self.session.undo_click)
        if undone is not None:
            self.state.message = "last click undone" if undone else "no click to undo"
        self.state.click_effort = self.session.click_effort()
        self.refresh_segments()

    def _click_controls(self) -> None:
        """Beside Add segment, under the segment list: the switch, + and -, Undo click, the clicks counted."""
        v3.VBtn("Click to fix", size="x-small", color=("click_mode ? 'primary' : ''",),
                click=(self.toggle_clicks, "[!click_mode]"), disabled=("!segments.length",),
                title="Correct the selected segment with clicks in the slice views",
                **tid("click-toggle", on=("click_mode",)))
        with v3.VBtnToggle(v_model=("click_sign",), mandatory=True, density="compact", divided=True,
                           style="height: 20px", update_modelValue=(self.set_click_sign, "[$event]")):
            v3.VBtn("+", value="+", size="x-small", title="a click says: this is the selected structure",
                    **tid("click-plus"))
            v3.VBtn("\u2212", value="-", size="x-small", title="a click says: this is not the selected structure",
                    **tid("click-minus"))
        v3.VBtn(icon="mdi-undo-variant", size="x-small", variant="text", click=self.undo_click,
                disabled=("!click_effort.undoable",), title="Undo click", **tid("click-undo"))
        html.Span("{{ click_effort.clicks }} clicks", v_if="click_mode", classes="ls-small",
                  **tid("click-status", clicks=("click_effort.clicks",)))
