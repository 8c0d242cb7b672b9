"""The page: trame widgets bound to an :class:`~.session.AnnotationSession`.

Kept thin on purpose: every handler calls one session method (or a helper of
:mod:`.view_controls`, :mod:`.shortcuts`, ``LumbarSegmentLib.retrain_readiness``) and copies
what it returns into the trame state; the session (tested without a browser) does the work.

Layout at a desktop size (1600x1000): the left drawer holds Cases, Segment, Correct and
Display; the segment list, Export and Retrain sit in a column right of the views, so
neither needs the drawer scrolled. Each slice view carries its name, slice number and
position, and the anatomical direction of its edges.

State keys the browser tests read (through elements with ``data-testid``):
``job`` (segmentation: state, fraction, message), ``segments`` (per segment: name,
colour, visibility, exact voxel count), ``export_result``, ``retrain`` and
``comparison`` (the publish gate's per-class table), the readouts of the views.
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
import traceback
from pathlib import Path

from trame.app.file_upload import ClientFile
from trame.widgets import client, html
from trame.widgets import vuetify3 as v3
from trame_vuetify.ui.vuetify3 import SinglePageWithDrawerLayout

from .session import EFFECT_NAMES, AnnotationSession, SessionError
from .shortcuts import HELP_ROWS, action_for, key_script
from .view_controls import WindowLevelDrag, mr_presets, slice_readout, step_slice

log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"
POLL_S = 0.5
KEY_TRIGGER = "lumbarseg_key"
CASE_STATES = ("new", "drafted", "corrected", "exported")
FOOTER = ("LumbarSegment annotation page: draft, correct and export lumbar-spine MR segmentations, and retrain "
          "the model on them. Views and editing tools: trame-slicer by Kitware (Apache-2.0), on trame and "
          "3D Slicer's MRML.")
CSS = """
.ls-small { font-size: 12px; }
.ls-panel .v-expansion-panel-text__wrapper { padding: 6px 8px; }
.ls-tools { display: grid !important; grid-template-columns: repeat(4, 1fr); height: auto !important; width: 100%; }
.ls-tools .v-btn { min-width: 0 !important; height: 52px !important; padding: 0 2px !important;
                   text-transform: none; letter-spacing: 0; font-size: 12px; }
.ls-overlay { position: absolute; pointer-events: none; color: #fff; font: 12px/1.3 sans-serif;
              text-shadow: 0 0 3px #000, 0 0 2px #000; z-index: 2; }
.ls-edge { font-weight: bold; font-size: 14px; }
.ls-right { width: 340px; min-width: 340px; overflow-y: auto; border-left: 1px solid rgba(0,0,0,.12); }
"""
SCROLL_SCRIPT = """
(function () {
  if (window.__lumbarsegScroll) return;
  window.__lumbarsegScroll = true;
  let last = null;
  setInterval(function () {  // keep the open case in sight in the case list
    const el = document.querySelector('[data-testid=cases] .v-list-item--active');
    if (el && el !== last) { el.scrollIntoView({block: 'nearest'}); last = el; }
  }, 400);
})();
"""
TOOL_TITLES = {"none": "View", "paint": "Paint", "erase": "Erase", "scissors": "Scissors", "draw": "Draw",
               "islands": "Islands", "smoothing": "Smoothing", "threshold": "Threshold"}
TOOL_ICONS = {"none": "mdi-cursor-default", "paint": "mdi-brush", "erase": "mdi-eraser", "scissors": "mdi-content-cut",
              "draw": "mdi-draw", "islands": "mdi-island", "smoothing": "mdi-blur", "threshold": "mdi-contrast-box"}


def sagittal_first_layout():
    """Sagittal view large on the left (the model works sagittally), axial and coronal beside it."""
    from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition

    return Layout(LayoutDirection.Horizontal,
                  [ViewLayoutDefinition.sagittal_view(),
                   Layout(LayoutDirection.Vertical, [ViewLayoutDefinition.axial_view(),
                                                     ViewLayoutDefinition.coronal_view()])],
                  flex_sizes=["3", "1"])


def tid(name, **data):
    """``data-testid`` (and other ``data-*``) attributes: stable hooks for the browser tests.

    trame passes only declared attributes through, so each one is declared with its
    HTML spelling (``data_voxels`` -> ``data-voxels``).
    """
    attrs = {"data_testid": name, **{f"data_{k}": v for k, v in data.items()}}
    return {"__properties": [(k, k.replace("_", "-")) for k in attrs], **attrs}


def _state_key(view_id: str) -> str:
    return "ls_ro_" + re.sub(r"[^A-Za-z0-9_]", "_", str(view_id))


class LumbarSegmentPage:
    """Builds the UI on ``server`` for ``session`` and keeps the state in step with it."""

    def __init__(self, server, session: AnnotationSession):
        from trame_slicer.core import LayoutManager
        from trame_slicer.rca_view import register_rca_factories

        self.server, self.session = server, session
        self.state, self.ctrl = server.state, server.controller
        self.views: dict[str, object] = {}  # trame view id -> slice view
        self._drags: list[WindowLevelDrag] = []
        self._job_t0: float | None = None
        self._init_state()
        register_rca_factories(session.app.view_manager, server, slice_view_ui_f=self._slice_view_ui)
        self.layout = LayoutManager(session.app.scene, session.app.view_manager, server)
        self.layout.register_layout_dict({"Sagittal first": sagittal_first_layout()})
        self.layout.set_layout("Sagittal first")
        # The page's icon comes from this server, never from the internet (the machine may be offline).
        server.serve["lumbarseg"] = str(STATIC)
        self.state.trame__favicon = "lumbarseg/favicon.png"
        self.state.trame__title = "LumbarSegment"
        self._poller: asyncio.Task | None = None
        session.editor.segmentation_modified.connect(self._on_segmentation_modified)
        self._segments_dirty = False
        server.trigger(KEY_TRIGGER)(self.on_key)
        self.state.change("window", "level")(self._on_wl_state)
        self.state.change("brush_mm")(self._on_brush_state)
        self.state.change("upload_file")(self._on_upload_state)
        self.build()
        self.ctrl.on_server_ready.add(self._start_polling)

    # ------------------------------------------------------------------ state
    def _init_state(self) -> None:
        s = self.state
        s.update({
            "cases": [], "case_id": None, "case_filter": "all", "models": [], "model": None, "mode": "fast",
            "job": {"state": "idle", "fraction": None, "message": "", "warnings": []}, "job_eta": "",
            "segments": [], "active_segment": None, "effect": "none", "brush_mm": self.session.brush_mm,
            "window": 0.0, "level": 0.0, "intensity_min": 0.0, "intensity_max": 1000.0, "wl_preset": None,
            "wl_presets": [], "threshold_low": 0.0, "threshold_high": 1000.0,
            "smoothing_mm": 3.0, "message": "", "error": "", "export_result": None, "upload_file": None,
            "retrain": {"state": "idle", "fraction": None, "message": ""}, "comparison": None,
            "readiness": "", "retrain_warning": None, "can_resume": False, "show_keys": False,
            "key_rows": [{"keys": k, "does": d} for k, d in HELP_ROWS],
            "effect_items": [{"title": TOOL_TITLES[n], "value": n, "icon": TOOL_ICONS[n]} for n in EFFECT_NAMES],
        })
        self.refresh_cases()
        self.refresh_models()
        self.refresh_readiness()

    def refresh_cases(self) -> None:
        self.state.cases = [e.to_row() for e in self.session.worklist.entries()]

    def refresh_models(self) -> None:
        models = self.session.model_choices()
        self.state.models = models
        if models and self.state.model not in [m["value"] for m in models]:
            self.state.model = models[0]["value"]

    def refresh_segments(self) -> None:
        self.state.segments = self.session.segments()
        self.state.active_segment = self.session.active_segment or None
        self._segments_dirty = False

    def refresh_readiness(self) -> None:
        from LumbarSegmentLib.retrain_readiness import readiness

        self.state.readiness = readiness(self.session.worklist.dataset).message()

    def _on_segmentation_modified(self, *_):
        self._segments_dirty = True  # counted on the next poll: a stroke fires many modified events

    def _guard(self, fn, *args, **kwargs):
        """Run an action; a user-facing error goes to the page's error bar instead of the log only."""
        self.state.error = ""
        try:
            return fn(*args, **kwargs)
        except (SessionError, ValueError, OSError, RuntimeError) as exc:
            log.debug("action failed", exc_info=True)
            self.state.error = str(exc) or type(exc).__name__
        except Exception as exc:  # noqa: BLE001 - keep the page alive, show what happened
            log.error("unexpected error\n%s", traceback.format_exc())
            self.state.error = f"unexpected error: {exc}"
        return None

    # ------------------------------------------------------------------ slice views
    def _slice_view_ui(self, server, view_id, view) -> None:
        """trame-slicer's gutter and slice slider, plus the readout, the edge letters and W/L drag."""
        from trame_slicer.app.ui import create_vertical_slice_view_gutter_ui

        create_vertical_slice_view_gutter_ui(server, view_id, view)
        key = _state_key(view_id)
        self.views[view_id] = view
        self.state[key] = None
        view.modified.connect(lambda *_: self._update_readout(view_id))
        self._drags.append(WindowLevelDrag(
            view, active=lambda: self.session.effect == "none" and self.session.volume_node is not None,
            get_wl=self.session.window_level, set_wl=self.session.set_window_level,
            span=lambda: float(self.state.intensity_max) - float(self.state.intensity_min),
            on_change=self._on_wl_dragged))
        ro = f"{key} || {{}}"
        with html.Div(v_if=key, classes="ls-overlay", style="top: 6px; right: 8px; text-align: right;",
                      **tid(("'readout-' + " + f"({ro}).name",), view=view_id, index=(f"({ro}).index",),
                            count=(f"({ro}).count",))):
            html.Span("{{ (%s).name }}" % ro, style=(f"'border-bottom: 2px solid ' + ({ro}).color",))
            html.Br()
            html.Span("slice {{ (%s).index }} / {{ (%s).count }}" % (ro, ro))
            html.Br()
            html.Span("{{ (%s).position }}" % ro)
        for edge, style in (("left", "left: 40px; top: 50%;"), ("right", "right: 8px; top: 50%;"),
                            ("top", "top: 6px; left: 50%;"), ("bottom", "bottom: 30px; left: 50%;")):
            html.Div("{{ (%s).%s }}" % (ro, edge), v_if=key, classes="ls-overlay ls-edge", style=style,
                     **tid(("'edge-' + " + f"({ro}).name + '-{edge}'",)))
        html.Div(style="display: none", **{"__properties": [("data_ls_view", "data-ls-view")],
                                          "data_ls_view": view_id})

    def _update_readout(self, view_id) -> None:
        view = self.views.get(view_id)
        if view is None:
            return
        try:
            readout = slice_readout(view) if self.session.volume_node is not None else None
        except (AttributeError, RuntimeError):  # a view being torn down
            readout = None
        with self.state:
            self.state[_state_key(view_id)] = readout

    def _view_for(self, view_id):
        """The view under the pointer, else the sagittal one (the model's plane)."""
        if view_id in self.views:
            return self.views[view_id]
        return next((v for v in self.views.values() if v.get_orientation() == "Sagittal"),
                    next(iter(self.views.values()), None))

    def _on_wl_dragged(self, window: float, level: float) -> None:
        with self.state:
            self.state.window, self.state.level = round(window, 1), round(level, 1)
            self.state.wl_preset = None

    # ------------------------------------------------------------------ keys
    def on_key(self, key: str, view_id=None) -> None:
        """A shortcut from the browser (see :mod:`.shortcuts`)."""
        found = action_for(str(key))
        if found is None:
            return
        action, arg = found
        if action == "undo":
            self.undo()
        elif action == "redo":
            self.redo()
        elif action == "slice":
            view = self._view_for(view_id)
            if view is not None and self.session.volume_node is not None:
                step_slice(view, int(arg))
                self._update_readout(next(k for k, v in self.views.items() if v is view))
        elif action == "tool":
            self.set_effect(str(arg))
        elif action == "brush":
            self.state.brush_mm = float(min(40, max(1, float(self.state.brush_mm) + int(arg))))
        elif action == "auto_wl":
            self.auto_window_level()
        elif action == "next_case":
            self.next_case()
        elif action == "help":
            self.state.show_keys = True

    # ------------------------------------------------------------------ actions
    def open_case(self, case_id: str) -> None:
        def go():
            self.session.load_case(case_id)
            self._after_load()
        self._guard(go)

    def next_case(self) -> None:
        entry = self.session.worklist.next_case(exclude=self.session.case_id)
        if entry is None:
            self.state.message = "no case left to draft or correct"
            return
        self.open_case(entry.case_id)

    def _on_upload_state(self, upload_file=None, **_) -> None:
        if not upload_file:
            return
        self.upload(upload_file)
        self.state.upload_file = None  # the box is empty again, ready for the next file

    def upload(self, files) -> None:
        def go():
            for f in files if isinstance(files, list) else [files]:
                cf = ClientFile(f)
                if cf.is_empty:
                    raise SessionError(f"{cf.name}: the upload arrived empty")
                self.session.upload(cf.name, cf.content)
            self._after_load()
        self._guard(go)

    def _after_load(self) -> None:
        """A newly opened case: nothing of the previous one may linger on the page."""
        s = self.session
        self.state.case_id = s.case_id
        lo, hi = s.intensity_range()
        self.state.intensity_min, self.state.intensity_max = float(lo), float(hi)
        auto = s.window_level()
        self.state.window, self.state.level = round(auto[0], 1), round(auto[1], 1)
        presets = mr_presets(auto, (float(lo), float(hi)))
        self._presets = presets
        self.state.wl_presets = list(presets)
        self.state.wl_preset = "Auto"
        self.state.threshold_low, self.state.threshold_high = float((lo + hi) / 2), float(hi)
        self.state.effect = "none"
        self.state.export_result = None
        self.state.retrain_warning = None
        self.state.job = {"state": "idle", "fraction": None, "message": "", "warnings": []}
        self.state.job_eta = ""
        self.state.message = f"opened {s.case_id}"
        self.refresh_segments()
        self.refresh_cases()
        for view_id in self.views:
            self._update_readout(view_id)

    def segment(self) -> None:
        def go():
            notes = self.session.start_segmentation(self.state.model, self.state.mode)
            self._job_t0 = time.monotonic()
            self.state.job = {"state": "running", "fraction": 0.0, "message": "starting", "warnings": notes}
            self.state.job_eta = "reading the volume and loading the model"
        self._guard(go)

    def cancel(self) -> None:
        self._guard(self.session.cancel_segmentation)
        self.state.job = {"state": "cancelled", "fraction": None, "message": "segmentation cancelled",
                          "warnings": []}
        self.state.job_eta = ""

    def set_effect(self, name: str) -> None:
        if self._guard(self.session.set_effect, name) is None and self.state.error:
            self.state.effect = self.session.effect
        else:
            self.state.effect = name

    def _on_brush_state(self, brush_mm=None, **_) -> None:
        if brush_mm is not None:
            self.set_brush(brush_mm)

    def set_brush(self, mm) -> None:
        self._guard(self.session.set_brush_mm, float(mm))

    def select_segment(self, sid: str) -> None:
        self._guard(self.session.select_segment, sid)
        self.state.active_segment = sid

    def toggle_visible(self, sid: str, visible: bool) -> None:
        self._guard(self.session.set_segment_visible, sid, bool(visible))
        self.refresh_segments()

    def add_segment(self) -> None:
        self._guard(self.session.add_segment, "")
        self.refresh_segments()

    def undo(self) -> None:
        self._guard(self.session.undo)
        self.refresh_segments()

    def redo(self) -> None:
        self._guard(self.session.redo)
        self.refresh_segments()

    def _on_wl_state(self, window=None, level=None, **_) -> None:
        """A slider moved, a value typed or clicked: apply it (a click sets the value as a drag does)."""
        if self.session.volume_node is None or window is None or level is None:
            return
        try:
            w, lv = float(window), float(level)
        except (TypeError, ValueError):
            return
        if (w, lv) != tuple(round(v, 1) for v in self.session.window_level()):
            self._guard(self.session.set_window_level, max(1.0, w), lv)

    def window_level(self) -> None:
        self._guard(self.session.set_window_level, float(self.state.window), float(self.state.level))

    def auto_window_level(self) -> None:
        res = self._guard(self.session.auto_window_level)
        if res:
            self.state.window, self.state.level = round(res[0], 1), round(res[1], 1)
            self.state.wl_preset = "Auto"

    def apply_preset(self, name) -> None:
        preset = getattr(self, "_presets", {}).get(name)
        if preset is None:
            return
        self.state.window, self.state.level = round(preset[0], 1), round(preset[1], 1)
        self.state.wl_preset = name
        self._guard(self.session.set_window_level, *preset)

    def islands(self, action: str) -> None:
        self._guard(self.session.apply_islands, action)
        self.refresh_segments()

    def smoothing(self, method: str) -> None:
        self._guard(self.session.apply_smoothing, float(self.state.smoothing_mm), method)
        self.refresh_segments()

    def threshold(self) -> None:
        self._guard(self.session.apply_threshold, float(self.state.threshold_low), float(self.state.threshold_high))
        self.refresh_segments()

    def export(self, force: bool = False) -> None:
        res = self._guard(self.session.export, force=bool(force))
        if res is not None:
            self.state.export_result = res
            self.state.message = (f"exported {res['case_id']} version {res['version']}" if res["written"]
                                  else "not exported")
        self.refresh_cases()
        self.refresh_readiness()

    def save(self) -> None:
        if self._guard(self.session.save_draft) is not None:
            self.state.message = f"draft of {self.session.case_id} saved"
        self.refresh_cases()

    # ------------------------------------------------------------------ retraining
    def retrain(self) -> None:
        """Start at once when the gate can grade the result; otherwise say why first and offer the choices."""
        from LumbarSegmentLib.retrain_readiness import readiness

        r = readiness(self.session.worklist.dataset)
        self.state.readiness = r.message()
        if r.can_start and not r.can_replace:
            self.state.retrain_warning = {"message": r.message(), "suggest": r.suggested_holdout()}
            return
        self.start_retrain()

    def hold_out_and_retrain(self) -> None:
        from LumbarSegmentLib.holdout import set_holdout

        suggest = (self.state.retrain_warning or {}).get("suggest") or []
        if suggest and self._guard(set_holdout, self.session.worklist.dataset, list(suggest)) is not None:
            self.refresh_readiness()
            self.start_retrain()

    def start_retrain(self) -> None:
        self.state.retrain_warning = None

        def go():
            run = self.session.start_retrain(self.state.model)
            self.state.retrain = {"state": "running", "fraction": 0.0, "message": f"training in {run}"}
            self.state.comparison = None
            self.state.can_resume = False
        self._guard(go)

    def stop_retrain(self) -> None:
        self._guard(self.session.stop_retrain)

    def resume_retrain(self) -> None:
        def go():
            self.session.resume_retrain()
            self.state.retrain = {"state": "running", "fraction": self.state.retrain.get("fraction"),
                                  "message": "resuming from the last checkpoint"}
            self.state.can_resume = False
        self._guard(go)

    # ------------------------------------------------------------------ polling
    def _start_polling(self, **_):
        if self._poller is None:
            self._poller = asyncio.ensure_future(self._poll_forever())

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            try:
                self.poll_once()
            except Exception:  # noqa: BLE001 - a polling error must not stop future polls
                log.error("poll failed\n%s", traceback.format_exc())

    def _eta(self, fraction) -> str:
        """Time so far and, once batches report, a linear estimate of the time left."""
        if self._job_t0 is None:
            return ""
        elapsed = time.monotonic() - self._job_t0
        if not fraction or fraction < 0.02:
            return f"{elapsed:.0f} s: reading the volume and loading the model"
        left = elapsed * (1 - fraction) / fraction
        return f"{elapsed:.0f} s, about {left:.0f} s left"

    def poll_once(self) -> None:
        s = self.session
        with self.state:
            if self.state.job.get("state") == "running":
                job = s.poll_segmentation()
                self.state.job = job.to_dict()
                self.state.job_eta = self._eta(job.fraction) if job.state == "running" else (
                    f"took {time.monotonic() - self._job_t0:.0f} s" if self._job_t0 and job.state == "done" else "")
                if job.state != "running":
                    self._segments_dirty = True
                    self.refresh_cases()
            if self.state.retrain.get("state") == "running":
                job = s.poll_retrain()
                self.state.retrain = job.to_dict()
                if job.state != "running":
                    self.state.comparison = s.publish_comparison()
                    self.state.can_resume = job.state == "cancelled" and "Resume" in (job.message or "")
                    self.refresh_models()
            if self._segments_dirty:
                self.refresh_segments()

    # ------------------------------------------------------------------ UI
    def build(self) -> None:
        with SinglePageWithDrawerLayout(self.server, full_height=True) as ui:
            self.ui = ui
            ui.title.set_text("LumbarSegment")
            ui.icon.hide() if hasattr(ui.icon, "hide") else None
            client.Style(CSS)
            client.Script(key_script(KEY_TRIGGER))
            client.Script(SCROLL_SCRIPT)
            with ui.toolbar:
                v3.VSpacer()
                html.Div("{{ case_id || 'no case open' }}", classes="mr-4 text-body-2", **tid("case-title"))
                v3.VBtn("Undo", prepend_icon="mdi-undo", click=self.undo, variant="text", title="Undo (Ctrl+Z)",
                        **tid("undo"))
                v3.VBtn("Redo", prepend_icon="mdi-redo", click=self.redo, variant="text", title="Redo (Ctrl+Y)",
                        **tid("redo"))
                v3.VBtn("Save", prepend_icon="mdi-content-save", click=self.save, variant="text", **tid("save"))
                v3.VBtn("Keys", prepend_icon="mdi-keyboard", click="show_keys = true", variant="text",
                        title="Keyboard shortcuts (?)", **tid("keys"))
            with ui.drawer as drawer:
                drawer.width = 380
                self._drawer()
            with ui.content:
                with html.Div(style="display: flex; height: 100%; width: 100%;"):
                    with html.Div(style="position: relative; flex: 1; height: 100%; min-width: 0;"):
                        self.layout.initialize_layout_grid(ui)
                        v3.VAlert(v_if="error", text=("error",), type="error", density="compact", closable=True,
                                  style="position: absolute; bottom: 8px; left: 8px; right: 8px; z-index: 10;",
                                  **tid("error"))
                    with html.Div(classes="ls-right", **tid("right-panel")):
                        self._right_panel()
            with ui.footer:
                ui.footer.clear()
                v3.VProgressCircular(indeterminate=("!!trame__busy",), color="#04a94d", size=16, width=3,
                                     classes="mr-2")
                html.Span(FOOTER, classes="text-caption text-grey-darken-1", **tid("footer"))
            self._keys_dialog()

    def _keys_dialog(self) -> None:
        with v3.VDialog(v_model=("show_keys",), max_width=520):
            with v3.VCard(title="Keyboard shortcuts", **tid("keys-help")):
                with v3.VCardText():
                    with v3.VTable(density="compact", classes="ls-small"):
                        with html.Tbody():
                            with html.Tr(v_for="r in key_rows", key="r.keys"):
                                html.Td("{{ r.keys }}", style="white-space: nowrap; font-weight: 600")
                                html.Td("{{ r.does }}")
                    html.Div("Keys act on the view under the mouse pointer; they are ignored while you type in a "
                             "field.", classes="ls-small mt-2")
                with v3.VCardActions():
                    v3.VSpacer()
                    v3.VBtn("Close", click="show_keys = false")

    def _drawer(self) -> None:
        with v3.VExpansionPanels(multiple=True, model_value=("panels", [0, 1, 2, 3]), classes="ls-panel",
                                 variant="accordion"):
            self._cases_panel()
            self._segment_panel()
            self._correct_panel()
            self._display_panel()
        html.Div("{{ message }}", classes="ls-small pa-2", **tid("message"))

    def _cases_panel(self) -> None:
        shown = "cases.filter(c => case_filter === 'all' || c.state === case_filter)"
        with v3.VExpansionPanel(title="Cases"):
            with v3.VExpansionPanelText():
                v3.VFileInput(label="Upload a volume (.nrrd .nii.gz .mha)", density="compact",
                              prepend_icon="mdi-upload", hide_details=True, v_model=("upload_file", None),
                              multiple=False, clearable=True, **tid("upload"))
                v3.VBtn("Next case", click=self.next_case, size="small", classes="my-1", **tid("next-case"),
                        prepend_icon="mdi-skip-next", title="The drafted case the model was least sure of (N)")
                with v3.VChipGroup(v_model=("case_filter",), mandatory=True, selected_class="text-primary",
                                   column=True, **tid("case-filter")):
                    v3.VChip("all {{ cases.length }}", value="all", size="x-small", filter=True,
                             **tid("filter-all"))
                    for st in CASE_STATES:
                        v3.VChip(f"{st} {{{{ cases.filter(c => c.state === '{st}').length }}}}", value=st,
                                 size="x-small", filter=True, **tid(f"filter-{st}"))
                with v3.VList(density="compact", max_height=300, classes="overflow-y-auto", **tid("cases")):
                    with v3.VListItem(v_for=f"c in {shown}", key="c.case_id", click=(self.open_case, "[c.case_id]"),
                                      active=("c.case_id === case_id",), title=("c.case_id",),
                                      **tid(("'case-' + c.case_id",))):
                        with v3.Template(v_slot_append=True):
                            v3.VChip("{{ c.state }}", size="x-small",
                                     color=("({new: 'grey', drafted: 'blue', corrected: 'orange', "
                                            "exported: 'green'})[c.state]",))
                    v3.VListItem(v_if=f"!{shown}.length", subtitle="no case in this list")

    def _segment_panel(self) -> None:
        with v3.VExpansionPanel(title="Segment"):
            with v3.VExpansionPanelText():
                v3.VSelect(label="Model", items=("models",), v_model=("model",), density="compact",
                           hide_details=True, classes="mb-1")
                v3.VSelect(label="Mode", items=("['fast', 'tta', 'ensemble']",), v_model=("mode",),
                           density="compact", hide_details=True, classes="mb-1")
                with html.Div(classes="d-flex"):
                    v3.VBtn("Segment", click=self.segment, color="primary", size="small",
                            disabled=("job.state === 'running' || !case_id",), **tid("segment"))
                    v3.VBtn("Cancel", click=self.cancel, size="small", classes="ml-2",
                            disabled=("job.state !== 'running'",), **tid("cancel"))
                v3.VProgressLinear(model_value=("(job.fraction || 0) * 100",), classes="my-1",
                                   indeterminate=("job.state === 'running' && !job.fraction",))
                html.Div("{{ job.message || (job.state === 'idle' ? '' : job.state) }}", classes="ls-small",
                         **tid("job", state=("job.state",)))
                html.Div("{{ job_eta }}", v_if="job_eta", classes="ls-small text-grey-darken-1", **tid("job-eta"))

    def _correct_panel(self) -> None:
        with v3.VExpansionPanel(title="Correct"):
            with v3.VExpansionPanelText():
                with v3.VBtnToggle(v_model=("effect",), mandatory=True, density="compact", divided=True,
                                   classes="ls-tools", update_modelValue=(self.set_effect, "[$event]")):
                    with v3.VBtn(v_for="t in effect_items", key="t.value", value=("t.value",), stacked=True,
                                 size="small", **tid(("'tool-' + t.value",))):
                        v3.VIcon("{{ t.icon }}", size="small")
                        html.Span("{{ t.title }}")
                v3.VSlider(label="Brush", v_model=("brush_mm",), min=1, max=40, step=1, thumb_label=True,
                           density="compact", hide_details=True, classes="mt-2", **tid("brush"))
                html.Div("brush {{ brush_mm }} mm ([ and ] change it)", classes="ls-small", **tid("brush-value"))
                with html.Div(v_if="effect === 'islands'", classes="d-flex"):
                    v3.VBtn("Keep largest", size="small", click=(self.islands, "['keep_largest']"))
                    v3.VBtn("Remove small", size="small", classes="ml-1", click=(self.islands, "['remove_small']"))
                with html.Div(v_if="effect === 'smoothing'", classes="d-flex align-center"):
                    v3.VTextField(label="kernel mm", v_model=("smoothing_mm",), type="number", density="compact",
                                  hide_details=True, style="max-width: 90px")
                    v3.VBtn("Median", size="small", classes="ml-1", click=(self.smoothing, "['median']"))
                    v3.VBtn("Close", size="small", classes="ml-1", click=(self.smoothing, "['closing']"))
                with html.Div(v_if="effect === 'threshold'", classes="d-flex align-center"):
                    v3.VTextField(label="low", v_model=("threshold_low",), type="number", density="compact",
                                  hide_details=True)
                    v3.VTextField(label="high", v_model=("threshold_high",), type="number", density="compact",
                                  hide_details=True, classes="ml-1")
                    v3.VBtn("Apply", size="small", classes="ml-1", click=self.threshold)

    def _display_panel(self) -> None:
        with v3.VExpansionPanel(title="Display (window / level)"):
            with v3.VExpansionPanelText():
                for name, label in (("window", "Window"), ("level", "Level")):
                    with html.Div(classes="d-flex align-center"):
                        v3.VSlider(label=label, v_model=(name,), min=(1 if name == "window" else "intensity_min",),
                                   max=("intensity_max",), step=1, density="compact", hide_details=True,
                                   disabled=("!case_id",), **tid(f"{name}-slider"))
                        v3.VTextField(v_model=(name,), type="number", density="compact", hide_details=True,
                                      variant="outlined", style="max-width: 96px", classes="ml-2",
                                      disabled=("!case_id",), **tid(f"{name}-value"))
                with html.Div(classes="d-flex align-center mt-1"):
                    v3.VSelect(label="MR preset", items=("wl_presets",), model_value=("wl_preset",),
                               update_modelValue=(self.apply_preset, "[$event]"), density="compact",
                               hide_details=True, disabled=("!case_id",), **tid("wl-preset"))
                    v3.VBtn("Auto", size="small", classes="ml-2", click=self.auto_window_level,
                            disabled=("!case_id",), title="Automatic window/level (A)", **tid("auto-wl"))
                html.Div("Without a tool (View, or Esc), left-drag in a view: right/left widens/narrows the "
                         "window, up/down raises/lowers the level.", classes="ls-small mt-1")

    def _right_panel(self) -> None:
        with v3.VExpansionPanels(multiple=True, model_value=("right_panels", [0, 1, 2]), classes="ls-panel",
                                 variant="accordion"):
            with v3.VExpansionPanel(title="Segments"):
                with v3.VExpansionPanelText():
                    self._segments_table()
            with v3.VExpansionPanel(title="Export"):
                with v3.VExpansionPanelText():
                    self._export_box()
            with v3.VExpansionPanel(title="Retrain"):
                with v3.VExpansionPanelText():
                    self._retrain_box()

    def _segments_table(self) -> None:
        with v3.VTable(density="compact", classes="ls-small", **tid("segments")):
            with html.Tbody():
                with html.Tr(v_for="s in segments", key="s.id",
                             style=("s.id === active_segment ? 'background: rgba(33,150,243,0.15)' : ''",),
                             **tid(("'segment-' + s.id",), voxels=("s.voxels",))):
                    with html.Td():
                        v3.VIcon("mdi-square", color=("s.color",), size="small")
                    html.Td("{{ s.name }}{{ s.edited ? ' *' : '' }}",
                            click=(self.select_segment, "[s.id]"), style="cursor: pointer")
                    html.Td("{{ s.voxels }}", classes="text-right")
                    with html.Td():
                        v3.VBtn(icon=("s.visible ? 'mdi-eye' : 'mdi-eye-off'",), size="x-small",
                                variant="text", click=(self.toggle_visible, "[s.id, !s.visible]"))
        html.Div("no segmentation yet: Segment drafts one", v_if="!segments.length && case_id", classes="ls-small")
        v3.VBtn("Add segment", size="x-small", click=self.add_segment, prepend_icon="mdi-plus")

    def _export_box(self) -> None:
        v3.VBtn("Export case", click=(self.export, "[false]"), color="primary", size="small",
                disabled=("!case_id",), **tid("export"))
        with html.Div(v_if="export_result && export_result.warning", classes="ls-small mt-1"):
            v3.VAlert(text=("export_result.warning",), type="warning", density="compact")
            v3.VBtn("Export anyway", size="x-small", v_if="!export_result.written",
                    click=(self.export, "[true]"), **tid("export-anyway"))
        html.Div("exported {{ export_result.case_id }} version {{ export_result.version }}; edited: "
                 "{{ (export_result.edited || []).join(', ') || 'none' }}",
                 v_if="export_result && export_result.written", classes="ls-small mt-1",
                 **tid("export-result"))

    def _retrain_box(self) -> None:
        html.Div("Fine-tunes the selected model on the exported cases. The new model becomes the one in use only "
                 "if the gate, grading it on held-out cases it never trained on, finds it at least as good.",
                 classes="ls-small")
        html.Div("{{ readiness }}", v_show="!retrain_warning", classes="ls-small mt-1 text-grey-darken-2",
                 **tid("readiness"))
        with html.Div(v_if="retrain_warning", classes="mt-1", **tid("retrain-warning")):
            v3.VAlert(text=("retrain_warning.message",), type="warning", density="compact", classes="ls-small")
            with html.Div(classes="d-flex flex-wrap mt-1", style="gap: 4px"):
                v3.VBtn("Hold out {{ (retrain_warning.suggest || []).join(', ') }} and train", size="x-small",
                        v_if="(retrain_warning.suggest || []).length", click=self.hold_out_and_retrain,
                        **tid("retrain-holdout"))
                v3.VBtn("Train anyway", size="x-small", click=self.start_retrain, **tid("retrain-anyway"))
                v3.VBtn("Cancel", size="x-small", click="retrain_warning = null", **tid("retrain-cancel"))
        with html.Div(classes="d-flex mt-1"):
            v3.VBtn("Retrain", size="small", click=self.retrain, **tid("retrain"),
                    disabled=("retrain.state === 'running'",))
            v3.VBtn("Stop", size="small", classes="ml-2", click=self.stop_retrain, **tid("stop-retrain"),
                    disabled=("retrain.state !== 'running'",))
            v3.VBtn("Resume", size="small", classes="ml-2", click=self.resume_retrain, **tid("resume"),
                    disabled=("!can_resume || retrain.state === 'running'",))
        v3.VProgressLinear(model_value=("(retrain.fraction || 0) * 100",), classes="my-1")
        html.Div("{{ retrain.state }}: {{ retrain.message }}", classes="ls-small",
                 **tid("retrain-status", state=("retrain.state",)))
        with v3.VTable(v_if="comparison", density="compact", classes="ls-small"):
            with html.Thead():
                with html.Tr():
                    for h in ("class", "in use", "new", "change"):
                        html.Th(h)
            with html.Tbody():
                with html.Tr(v_for="r in comparison.rows", key="r['class']"):
                    html.Td("{{ r['class'] }}")
                    html.Td("{{ r.current == null ? '-' : r.current.toFixed(3) }}")
                    html.Td("{{ r.candidate == null ? '-' : r.candidate.toFixed(3) }}")
                    html.Td("{{ r.delta == null ? '-' : (r.delta >= 0 ? '+' : '') + r.delta.toFixed(3) }}")
        html.Div("{{ comparison.ref }}: {{ comparison.default ? 'now the default' : 'not the default' }} "
                 "({{ comparison.reason }})", v_if="comparison", classes="ls-small", **tid("comparison"))
