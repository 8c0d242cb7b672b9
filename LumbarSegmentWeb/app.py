"""The page: trame widgets bound to an :class:`~.session.AnnotationSession`.

Kept thin on purpose: every handler calls one session method (or a helper of
:mod:`.view_controls`, :mod:`.shortcuts`, ``LumbarSegmentLib.dataset.readiness``) and copies
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
from trame.widgets import html

from .click_page import ClickControls
from .editing_panel import EFFECT_NAMES
from .levels_page import LevelsControls
from . import advanced
from .page_layout import KEY_TRIGGER, PageLayout, tid
from .session import AnnotationSession
from .session_core import SessionError
from .shortcuts import HELP_ROWS, action_for
from .view_controls import WindowLevelDrag, mr_presets, slice_readout, step_slice

log = logging.getLogger(__name__)
STATIC = Path(__file__).resolve().parent / "static"
POLL_S = 0.5
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


def _state_key(view_id: str) -> str:
    return "ls_ro_" + re.sub(r"[^A-Za-z0-9_]", "_", str(view_id))


class LumbarSegmentPage(ClickControls, LevelsControls, PageLayout):
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
            "key_rows": [{"keys": k, "does": d} for k, d in HELP_ROWS], **advanced.initial_state(),
            "effect_items": [{"title": TOOL_TITLES[n], "value": n, "icon": TOOL_ICONS[n]} for n in EFFECT_NAMES],
        })
        self._init_click_state()
        self._init_levels_state()
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
        self.refresh_levels()

    def refresh_readiness(self) -> None:
        from LumbarSegmentLib.dataset.readiness import readiness

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
            view, active=lambda: self.session.effect == "none" and self.session.volume_node is not None
            and not self.state.click_mode,
            get_wl=self.session.window_level, set_wl=self.session.set_window_level,
            span=lambda: float(self.state.intensity_max) - float(self.state.intensity_min),
            on_change=self._on_wl_dragged))
        self._watch_clicks(view)
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
            notes = self.session.load_case(case_id)
            self._after_load()
            self.state.error = " ".join(notes or ())
        self._guard(go)
        self.state.case_id = self.session.case_id  # the title names the case really open, also after an error

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
        self.state.case_id = self.session.case_id
        self.refresh_cases()

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
        self._reset_clicks()
        self.refresh_segments()
        self.refresh_cases()
        for view_id in self.views:
            self._update_readout(view_id)

    def segment(self, settings: dict | None = None) -> None:
        """Segment clicked: ``settings`` are the Advanced values the page sent with the click (the page's
        synced state when called without them)."""
        def go():
            notes = self.session.start_segmentation(self.session.offered_model(self.state.model), self.state.mode,
                                                    levels=self.state.levels_on is True,
                                                    advanced=advanced.values_from_state(self.state) if settings is None
                                                    else settings)
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
        self.state.click_mode = self.state.click_mode and name == "none"  # a tool puts click to fix down
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

    def remove_segment(self, sid: str) -> None:
        self._guard(self.session.remove_segment, sid)
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
        from LumbarSegmentLib.dataset.readiness import readiness

        r = readiness(self.session.worklist.dataset)
        self.state.readiness = r.message()
        if r.can_start and not r.can_replace:
            self.state.retrain_warning = {"message": r.message(), "suggest": r.suggested_holdout()}
            return
        self.start_retrain()

    def hold_out_and_retrain(self) -> None:
        from LumbarSegmentLib.dataset.holdout import set_holdout

        suggest = (self.state.retrain_warning or {}).get("suggest") or []
        if suggest and self._guard(set_holdout, self.session.worklist.dataset, list(suggest)) is not None:
            self.refresh_readiness()
            self.start_retrain()

    def start_retrain(self) -> None:
        self.state.retrain_warning = None

        def go():
            run = self.session.start_retrain(self.session.offered_model(self.state.model))
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
