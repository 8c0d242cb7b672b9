"""The page: trame widgets bound to an :class:`~.session.AnnotationSession`.

Kept thin on purpose: every handler calls one session method and copies what it
returns into the trame state; the session (tested without a browser) does the work.

State keys the browser tests read (through elements with ``data-testid``):
``job`` (segmentation: state, fraction, message), ``segments`` (per segment: name,
colour, visibility, exact voxel count), ``export_result``, ``retrain`` and
``comparison`` (the publish gate's per-class table).
"""
from __future__ import annotations

import asyncio
import logging
import traceback
from pathlib import Path

from trame.app.file_upload import ClientFile
from trame.widgets import client, html
from trame.widgets import vuetify3 as v3
from trame_vuetify.ui.vuetify3 import SinglePageWithDrawerLayout

from .session import EFFECT_NAMES, AnnotationSession, SessionError

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


def tid(name, **data):
    """``data-testid`` (and other ``data-*``) attributes: stable hooks for the browser tests.

    trame passes only declared attributes through, so each one is declared with its
    HTML spelling (``data_voxels`` -> ``data-voxels``).
    """
    attrs = {"data_testid": name, **{f"data_{k}": v for k, v in data.items()}}
    return {"__properties": [(k, k.replace("_", "-")) for k in attrs], **attrs}


class LumbarSegmentPage:
    """Builds the UI on ``server`` for ``session`` and keeps the state in step with it."""

    def __init__(self, server, session: AnnotationSession):
        from trame_slicer.core import LayoutManager
        from trame_slicer.rca_view import register_rca_factories

        self.server, self.session = server, session
        self.state, self.ctrl = server.state, server.controller
        register_rca_factories(session.app.view_manager, server)
        self.layout = LayoutManager(session.app.scene, session.app.view_manager, server)
        self.layout.register_layout_dict({"Sagittal first": sagittal_first_layout()})
        self.layout.set_layout("Sagittal first")
        # The page's icon comes from this server, never from the internet (the machine may be offline).
        server.serve["lumbarseg"] = str(STATIC)
        self.state.trame__favicon = "lumbarseg/favicon.png"
        self.state.trame__title = "LumbarSegment"
        self._init_state()
        self._poller: asyncio.Task | None = None
        session.editor.segmentation_modified.connect(self._on_segmentation_modified)
        self._segments_dirty = False
        self.build()
        self.ctrl.on_server_ready.add(self._start_polling)

    # ------------------------------------------------------------------ state
    def _init_state(self) -> None:
        s = self.state
        s.update({
            "cases": [], "case_id": None, "models": [], "model": None, "mode": "fast",
            "job": {"state": "idle", "fraction": None, "message": "", "warnings": []},
            "segments": [], "active_segment": None, "effect": "none", "brush_mm": self.session.brush_mm,
            "window": 0.0, "level": 0.0, "intensity_max": 1000.0, "threshold_low": 0.0, "threshold_high": 1000.0,
            "smoothing_mm": 3.0, "message": "", "error": "", "export_result": None,
            "retrain": {"state": "idle", "fraction": None, "message": ""}, "comparison": None,
            "effect_items": [{"title": TOOL_TITLES[n], "value": n, "icon": TOOL_ICONS[n]} for n in EFFECT_NAMES],
        })
        self.refresh_cases()
        self.refresh_models()

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
        s = self.session
        self.state.case_id = s.case_id
        lo, hi = s.intensity_range()
        self.state.intensity_max = float(hi)
        self.state.window, self.state.level = s.window_level()
        self.state.threshold_low, self.state.threshold_high = float((lo + hi) / 2), float(hi)
        self.state.effect = "none"
        self.state.export_result = None
        self.state.message = f"opened {s.case_id}"
        self.refresh_segments()
        self.refresh_cases()

    def segment(self) -> None:
        def go():
            notes = self.session.start_segmentation(self.session.offered_model(self.state.model), self.state.mode)
            self.state.job = {"state": "running", "fraction": 0.0, "message": "starting", "warnings": notes}
        self._guard(go)

    def cancel(self) -> None:
        self._guard(self.session.cancel_segmentation)
        self.state.job = {"state": "cancelled", "fraction": None, "message": "segmentation cancelled",
                          "warnings": []}

    def set_effect(self, name: str) -> None:
        if self._guard(self.session.set_effect, name) is None and self.state.error:
            self.state.effect = self.session.effect
        else:
            self.state.effect = name

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

    def window_level(self) -> None:
        self._guard(self.session.set_window_level, float(self.state.window), float(self.state.level))

    def auto_window_level(self) -> None:
        res = self._guard(self.session.auto_window_level)
        if res:
            self.state.window, self.state.level = res

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

    def save(self) -> None:
        if self._guard(self.session.save_draft) is not None:
            self.state.message = f"draft of {self.session.case_id} saved"
        self.refresh_cases()

    def retrain(self) -> None:
        def go():
            run = self.session.start_retrain(self.session.offered_model(self.state.model))
            self.state.retrain = {"state": "running", "fraction": 0.0, "message": f"training in {run}"}
            self.state.comparison = None
        self._guard(go)

    def stop_retrain(self) -> None:
        self._guard(self.session.stop_retrain)

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

    def poll_once(self) -> None:
        s = self.session
        with self.state:
            if self.state.job.get("state") == "running":
                job = s.poll_segmentation()
                self.state.job = job.to_dict()
                if job.state != "running":
                    self._segments_dirty = True
                    self.refresh_cases()
            if self.state.retrain.get("state") == "running":
                job = s.poll_retrain()
                self.state.retrain = job.to_dict()
                if job.state != "running":
                    self.state.comparison = s.publish_comparison()
                    self.refresh_models()
            if self._segments_dirty:
                self.refresh_segments()

    # ------------------------------------------------------------------ UI
    def build(self) -> None:
        with SinglePageWithDrawerLayout(self.server, full_height=True) as ui:
            self.ui = ui
            ui.title.set_text("LumbarSegment")
            ui.icon.hide() if hasattr(ui.icon, "hide") else None
            client.Style(".ls-small { font-size: 12px; } .ls-panel .v-expansion-panel-text__wrapper { padding: 6px 8px; }")
            with ui.toolbar:
                v3.VSpacer()
                html.Div("{{ case_id || 'no case open' }}", classes="mr-4 text-body-2", **tid("case-title"))
                v3.VBtn("Undo", prepend_icon="mdi-undo", click=self.undo, variant="text", **tid("undo"))
                v3.VBtn("Redo", prepend_icon="mdi-redo", click=self.redo, variant="text", **tid("redo"))
                v3.VBtn("Save", prepend_icon="mdi-content-save", click=self.save, variant="text", **tid("save"))
            with ui.drawer as drawer:
                drawer.width = 360
                self._drawer()
            with ui.content:
                with html.Div(style="position: relative; height: 100%; width: 100%;"):
                    self.layout.initialize_layout_grid(ui)
                    v3.VAlert(v_if="error", text=("error",), type="error", density="compact", closable=True,
                              style="position: absolute; bottom: 8px; left: 8px; right: 8px; z-index: 10;",
                              **tid("error"))

    def _drawer(self) -> None:
        with v3.VExpansionPanels(multiple=True, model_value=("panels", [0, 1, 2, 3, 4, 5]), classes="ls-panel",
                                 variant="accordion"):
            with v3.VExpansionPanel(title="Cases"):
                with v3.VExpansionPanelText():
                    v3.VFileInput(label="Upload a volume (.nrrd .nii.gz .mha)", density="compact",
                                  prepend_icon="mdi-upload", hide_details=True, **tid("upload"),
                                  update_modelValue=(self.upload, "[$event]"), multiple=False)
                    v3.VBtn("Next case", click=self.next_case, size="small", classes="my-1", **tid("next-case"),
                            prepend_icon="mdi-skip-next")
                    with v3.VList(density="compact", max_height=180, classes="overflow-y-auto",
                                  **tid("cases")):
                        with v3.VListItem(v_for="c in cases", key="c.case_id", click=(self.open_case, "[c.case_id]"),
                                          active=("c.case_id === case_id",), title=("c.case_id",)):
                            with v3.Template(v_slot_append=True):
                                v3.VChip("{{ c.state }}", size="x-small",
                                         color=("({new: 'grey', drafted: 'blue', corrected: 'orange', "
                                                "exported: 'green'})[c.state]",))
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
                                       indeterminate=("job.state === 'running' && job.fraction === null",))
                    html.Div("{{ job.message || job.state }}", classes="ls-small", **tid("job", state=("job.state",)))
            with v3.VExpansionPanel(title="Correct"):
                with v3.VExpansionPanelText():
                    with v3.VBtnToggle(v_model=("effect",), mandatory=True, density="compact", divided=True,
                                       classes="flex-wrap", update_modelValue=(self.set_effect, "[$event]")):
                        with v3.VBtn(v_for="t in effect_items", key="t.value", value=("t.value",), size="small",
                                     **tid(("'tool-' + t.value",))):
                            html.Span("{{ t.title }}")
                    v3.VSlider(label="Brush (mm)", v_model=("brush_mm",), min=1, max=40, step=1, thumb_label=True,
                               density="compact", hide_details=True, end=(self.set_brush, "[$event]"),
                               **tid("brush"))
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
                    html.Div("Window / level", classes="ls-small mt-2")
                    v3.VSlider(v_model=("window",), min=1, max=("intensity_max",), density="compact",
                               hide_details=True, end=self.window_level, **tid("window"))
                    v3.VSlider(v_model=("level",), min=0, max=("intensity_max",), density="compact",
                               hide_details=True, end=self.window_level, **tid("level"))
                    v3.VBtn("Auto W/L", size="x-small", click=self.auto_window_level)
            with v3.VExpansionPanel(title="Segments"):
                with v3.VExpansionPanelText():
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
                                    v3.VBtn(icon="mdi-delete-outline", size="x-small", variant="text",
                                            title="remove this segment", click=(self.remove_segment, "[s.id]"),
                                            **tid(("'remove-' + s.id",)))
                    v3.VBtn("Add segment", size="x-small", click=self.add_segment, prepend_icon="mdi-plus")
            with v3.VExpansionPanel(title="Export"):
                with v3.VExpansionPanelText():
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
            with v3.VExpansionPanel(title="Retrain"):
                with v3.VExpansionPanelText():
                    html.Div("Fine-tunes the selected model on the exported cases; the new model is published "
                             "and becomes the default only if the gate finds it at least as good.",
                             classes="ls-small")
                    with html.Div(classes="d-flex mt-1"):
                        v3.VBtn("Retrain", size="small", click=self.retrain, **tid("retrain"),
                                disabled=("retrain.state === 'running'",))
                        v3.VBtn("Stop", size="small", classes="ml-2", click=self.stop_retrain,
                                disabled=("retrain.state !== 'running'",))
                    v3.VProgressLinear(model_value=("(retrain.fraction || 0) * 100",), classes="my-1")
                    html.Div("{{ retrain.state }}: {{ retrain.message }}", classes="ls-small", **tid("retrain-status"))
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
                             "({{ comparison.reason }})", v_if="comparison", classes="ls-small")
            html.Div("{{ message }}", classes="ls-small pa-2", **tid("message"))
