"""The page's widgets: drawer (Cases, Segment, Correct, Display), views, right column, footer.

A mixin of :class:`.app.LumbarSegmentPage`: the widgets call its handlers (``self.segment``...)
and read the state keys it keeps; nothing here changes state on the server.
"""
from __future__ import annotations

from trame.widgets import client, html
from trame.widgets import vuetify3 as v3
from trame_vuetify.ui.vuetify3 import SinglePageWithDrawerLayout

from .advanced import advanced_args
from .shortcuts import key_script

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
def tid(name, **data):
    """``data-testid`` (and other ``data-*``) attributes: stable hooks for the browser tests.

    trame passes only declared attributes through, so each one is declared with its
    HTML spelling (``data_voxels`` -> ``data-voxels``).
    """
    attrs = {"data_testid": name, **{f"data_{k}": v for k, v in data.items()}}
    return {"__properties": [(k, k.replace("_", "-")) for k in attrs], **attrs}



class PageLayout:
    """``build()`` and its parts; mixed into the page, which provides the handlers and the state."""

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
                with html.Div(classes="d-flex align-center mb-1"):  # one row: the left column's height is tight
                    v3.VSelect(label="Mode", items=("['fast', 'tta', 'ensemble']",), v_model=("mode",),
                               density="compact", hide_details=True)
                    v3.VCheckbox(label="Levels", v_model=("levels_on",), density="compact", hide_details=True,
                                 classes="ml-2 flex-grow-0", title="one segment per level: L1..L5, L4-L5, ...",
                                 **tid("levels-on"))
                self._advanced_settings()
                with html.Div(classes="d-flex"):
                    v3.VBtn("Segment", click=(self.segment, advanced_args()), color="primary", size="small",
                            disabled=("job.state === 'running' || !case_id",), **tid("segment"))
                    v3.VBtn("Cancel", click=self.cancel, size="small", classes="ml-2",
                            disabled=("job.state !== 'running'",), **tid("cancel"))
                v3.VProgressLinear(model_value=("(job.fraction || 0) * 100",), classes="my-1",
                                   indeterminate=("job.state === 'running' && !job.fraction",))
                html.Div("{{ job.message || (job.state === 'idle' ? '' : job.state) }}", classes="ls-small",
                         **tid("job", state=("job.state",)))
                html.Div("{{ job_eta }}", v_if="job_eta", classes="ls-small text-grey-darken-1", **tid("job-eta"))

    def _advanced_settings(self) -> None:
        """Precision, smoothing, BN adaptation, post-processing, tile, overlap, runtime, box: drawn from the options' specs
        (:mod:`.advanced`); checked on Segment, with the same messages as the command line's."""
        from .advanced import widgets

        with v3.VExpansionPanels(classes="mb-1", **tid("advanced")):
            with v3.VExpansionPanel(title="Advanced"):
                with v3.VExpansionPanelText():
                    for row in widgets():
                        common = dict(label=row["label"], v_model=(row["key"],), density="compact", classes="mb-1",
                                      title=row["help"], hint=row["hint"], **tid(f"advanced-{row['name']}"))
                        if row["widget"] == "switch":
                            v3.VCheckbox(hide_details=True, **common)
                        elif row["widget"] == "select":
                            v3.VSelect(items=(repr(row["items"]),), hide_details=True, **common)
                        elif row["widget"] == "combobox":
                            v3.VCombobox(items=(repr(row["items"]),), persistent_hint=False, **common)
                        else:
                            v3.VTextField(type="number", min=row["min"], max=row["max"], step=row["step"], **common)

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
        with v3.VExpansionPanels(multiple=True, model_value=("right_panels", [0, 1, 2, 3]), classes="ls-panel",
                                 variant="accordion"):
            with v3.VExpansionPanel(title="Segments"):
                with v3.VExpansionPanelText():
                    self._segments_table()
            with v3.VExpansionPanel(title="Levels", **tid("levels-panel")):
                with v3.VExpansionPanelText():
                    self._levels_box()  # levels_page.py
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
                        v3.VBtn(icon="mdi-delete-outline", size="x-small", variant="text",
                                title="remove this segment", click=(self.remove_segment, "[s.id]"),
                                **tid(("'remove-' + s.id",)))
        html.Div("no segmentation yet: Segment drafts one", v_if="!segments.length && case_id", classes="ls-small")
        with html.Div(classes="d-flex flex-wrap align-center", style="gap: 4px"):
            v3.VBtn("Add segment", size="x-small", click=self.add_segment, prepend_icon="mdi-plus")
            self._click_controls()  # beside the list: the selected segment is what a click fixes

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
