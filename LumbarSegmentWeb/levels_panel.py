"""The Levels panel's session side: the levels table (names, flags, heights, volumes) and its CSV.

The numbers come from ``LumbarSegmentLib.slicer.level_table``, the code behind the Slicer module's
table and ``lumbarseg segment --measurements``: the open segmentation's level segments (a draft with
levels, or a manual segmentation whose segments are named ``L1``, ``L4-L5``, ...) are measured on the
open volume's grid. Listing and shifting the names stay in :mod:`.drafting_panel`.

The CSV is written under ``<work>/measurements/`` and nowhere else. A file name sent by the page is
checked, not cleaned up: letters, digits, ``_ . -``, starting with a letter or digit, ending in
``.csv``, at most 64 characters; anything else (a folder part, ``..``, a hidden name) is refused.
"""
from __future__ import annotations

import re
from pathlib import Path

from .session_core import SessionCore, SessionError

CSV_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,59}\.csv")
MEASUREMENTS_DIR = "measurements"


def checked_csv_name(name) -> str:
    """``name`` if it is a plain CSV file name this server may create; :class:`SessionError` otherwise."""
    if not isinstance(name, str) or not CSV_NAME.fullmatch(name) or ".." in name:
        raise SessionError("not a file name this page saves to: use letters, digits, _ . - and end in .csv "
                           "(at most 64 characters, no folders)")
    return name


class LevelsPanel(SessionCore):
    """Measure the open segmentation's levels; the table the page shows; save it as the CSV."""

    _measured: list[dict] = []
    _measured_node: object = None  # the segmentation the measurements belong to

    def level_table(self) -> list[dict]:
        """One row per level segment (``level_table.COLUMNS`` keys, numbers as text with one decimal).

        Heights and volumes are filled once the levels were measured on this segmentation.
        """
        from LumbarSegmentLib.slicer.level_table import table_rows

        measured = self._measured if self._measured_node is self.seg_node else []
        return table_rows(self.seg_node, measured)

    def measure_levels(self) -> list[dict]:
        """Measure every level segment of the open segmentation; returns :meth:`level_table`."""
        from LumbarSegmentLib.slicer.bridge import MRMLError
        from LumbarSegmentLib.slicer.level_table import measure_segmentation

        if self.volume_node is None or self.seg_node is None:
            raise SessionError("open a case with a segmentation first")
        try:
            self._measured = measure_segmentation(self.seg_node, self.volume_node)
        except MRMLError as exc:
            raise SessionError(str(exc)) from None
        self._measured_node = self.seg_node
        return self.level_table()

    def measured(self) -> bool:
        return bool(self._measured) and self._measured_node is self.seg_node

    def measurements_csv(self) -> str:
        """The table as the ``--measurements`` CSV text (what the page offers as a download)."""
        from LumbarSegmentLib.spine.measurements import to_csv

        if not self.measured():
            raise SessionError("measure the levels first")
        return to_csv(self._measured)

    def default_csv_name(self) -> str:
        stem = re.sub(r"\.{2,}", ".", self.case_id or "levels")[:48]  # case ids are plain names already
        return f"{stem}_levels.csv"

    def save_measurements(self, name: str | None = None) -> Path:
        """Write the CSV to ``<work>/measurements/<name>`` (default ``<case>_levels.csv``); returns the path."""
        from LumbarSegmentLib.slicer.level_table import save_csv

        name = checked_csv_name(self.default_csv_name() if name in (None, "") else name)
        if not self.measured():
            raise SessionError("measure the levels first")
        folder = self.worklist.work / MEASUREMENTS_DIR
        folder.mkdir(exist_ok=True)
        return save_csv(self._measured, folder / name)
