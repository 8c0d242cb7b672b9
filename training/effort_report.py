"""``lumbarseg-train effort DATA``: the effort ledger of a dataset, per drafting model, with a chart.

Reads every exported case (newest version of each) and summarises its ``effort`` record
(:mod:`LumbarSegmentLib.dataset.effort`): drafts accepted without edits, median voxels corrected and
median clicks and median active minutes per model version ("by hand": cases nobody drafted). Writes
nothing unless ``--chart`` / ``--json`` name files.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from LumbarSegmentLib.dataset.cases import list_cases
from LumbarSegmentLib.dataset.effort import markdown, summarise


def effort_chart(rows: list[dict], out: Path) -> Path:
    """Bars per drafting model (PNG): the share of drafts accepted as they came, median voxels corrected and
    median active minutes - side by side, since a model can save voxels and still cost time."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from LumbarSegmentLib.core.files import atomic_path

    rows = [r for r in rows if r["cases"]]
    names = [r["model"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(max(9, 2.4 * len(rows) + 4), 3.2))
    axes[0].bar(names, [100 * r["accepted_unedited"] / r["cases"] for r in rows], color="#55a868")
    axes[0].set_title("drafts accepted without edits (%)")
    axes[1].bar(names, [r["median_voxels_corrected"] for r in rows], color="#4c72b0")
    axes[1].set_title("median voxels corrected per case")
    axes[2].bar(names, [r["median_active_seconds"] / 60 for r in rows], color="#dd8452")
    axes[2].set_title("median active minutes per case")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return out


def effort_cli(a) -> int:
    rows = summarise(list_cases(a.data))
    print(markdown(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    if a.chart:
        if not any(r["cases"] for r in rows):
            print("no case has an effort record yet: no chart written")
        elif importlib.util.find_spec("matplotlib") is None:
            print("matplotlib is not installed: no chart written (pip install matplotlib); the table above "
                  "has the same numbers")
        else:
            print(f"chart: {effort_chart(rows, Path(a.chart))}")
    return 0
