"""The page's Levels panel: the level list with its flags, Levels up / down, Measure levels, the table, the CSV.

A mixin of :class:`.app.LumbarSegmentPage` (which has ``state``, ``session`` and ``_guard``); each handler
calls one session method (:mod:`.drafting_panel` for the names, :mod:`.levels_panel` for the numbers)
and copies what it returns into the state.

State keys: ``levels_on`` (the Segment panel's "Levels" box: draft one segment per level),
``level_rows`` (one row per level segment: ``level``, ``structure``, ``flags`` and the heights and
volume as text, see ``LumbarSegmentLib.slicer.level_table.COLUMNS``), ``levels_csv`` (``{"name",
"text"}`` once measured: what Download offers) and ``levels_saved`` (where Save CSV wrote).
"""
from __future__ import annotations

from trame.widgets import html
from trame.widgets import vuetify3 as v3

from .page_layout import tid

# (row key, short header, what it means): the panel is narrow, the title says it in full
HEADERS = (("level", "Level", "level name"), ("flags", "Flags", "the ordering check's flags: review these"),
           ("anterior", "Ant.", "anterior height (mm)"), ("middle", "Mid.", "middle height (mm)"),
           ("posterior", "Post.", "posterior height (mm)"), ("volume", "mm3", "volume (mm3)"))


class LevelsControls:
    """Handlers and widgets of the Levels panel."""

    def _init_levels_state(self) -> None:
        self.state.update({"levels_on": False, "level_rows": [], "levels_csv": None, "levels_saved": "",
                           "levels_csv_name": ""})

    def refresh_levels(self) -> None:
        """The list as the open segmentation stands (names, flags, and the numbers if measured)."""
        self.state.level_rows = self.session.level_table()
        measured = self.session.measured()
        self.state.levels_csv = ({"name": self.session.default_csv_name(), "text": self.session.measurements_csv()}
                                 if measured else None)
        if not measured:
            self.state.levels_saved = ""

    def shift_levels(self, steps) -> None:
        if type(steps) is not int or steps not in (-1, 1):  # a client may send anything: one level, up or down
            self.state.error = "levels move one level up or down"
            return
        names = self._guard(self.session.shift_levels, steps)
        if names is not None:
            self.state.message = "levels: " + " ".join(names)
        self.refresh_segments()

    def measure_levels(self) -> None:
        rows = self._guard(self.session.measure_levels)
        if rows is not None:
            self.state.message = f"measured {len(rows)} levels"
        self.refresh_levels()

    def save_levels_csv(self, name=None) -> None:
        path = self._guard(self.session.save_measurements, name)
        if path is not None:
            self.state.levels_saved = f"saved to {path.parent.name}/{path.name} in the work folder"
            self.state.message = f"measurements saved as {path.name}"

    def _levels_box(self) -> None:
        """The list with flags and numbers, and the actions on it."""
        with v3.VTable(density="compact", classes="ls-small", v_if="level_rows.length", **tid("levels")):
            with html.Thead():
                with html.Tr():
                    for _, header, title in HEADERS:
                        html.Th(header, title=title, classes="px-1")
            with html.Tbody():
                with html.Tr(v_for="r in level_rows", key="r.segment_id",
                             **tid(("'level-' + r.level",), flags=("r.flags",), middle=("r.middle",))):
                    for key, _, _ in HEADERS:
                        extra = {"style": ("r.flags ? 'color: #c62828' : ''",)} if key == "flags" else {}
                        html.Td("{{ r.%s }}" % key, classes="px-1" if key in ("level", "flags") else "px-1 text-right",
                                **extra)
        html.Div("no level segments: tick Levels before Segment, or name segments L1, L4-L5, ...",
                 v_if="!level_rows.length && segments.length", classes="ls-small")
        with html.Div(classes="d-flex flex-wrap mt-1", style="gap: 4px"):
            v3.VBtn("Levels up", size="x-small", click=(self.shift_levels, "[-1]"), disabled=("!level_rows.length",),
                    title="rename every level one up (L5 becomes L4, L4-L5 becomes L3-L4)", **tid("levels-up"))
            v3.VBtn("Levels down", size="x-small", click=(self.shift_levels, "[1]"), disabled=("!level_rows.length",),
                    title="rename every level one down (L4 becomes L5, L4-L5 becomes L5-S1)", **tid("levels-down"))
            v3.VBtn("Measure levels", size="x-small", click=self.measure_levels, disabled=("!level_rows.length",),
                    title="heights and volumes of every level segment, as lumbarseg segment --measurements",
                    **tid("levels-measure"))
            v3.VBtn("Save CSV", size="x-small", click=(self.save_levels_csv, "[levels_csv_name]"),
                    disabled=("!levels_csv",), title="write the table to the work folder's measurements/",
                    **tid("levels-save"))
            v3.VBtn("Download", size="x-small", disabled=("!levels_csv",),
                    click="utils.download(levels_csv.name, levels_csv.text, 'text/csv')", **tid("levels-download"))
        v3.VTextField(v_if="levels_csv", v_model=("levels_csv_name",), label="file name (default: CASE_levels.csv)",
                      density="compact", hide_details=True, classes="mt-1", **tid("levels-csv-name"))
        html.Div("{{ levels_saved }}", v_if="levels_saved", classes="ls-small", **tid("levels-saved"))
