"""``lumbarseg segment`` reports its batches as ``batch`` events in ``$LUMBARSEG_PROGRESS``.

The Slicer module (segment_job.py) and the browser front end run the CLI as a child and draw a
determinate progress bar from those events only; if the CLI stops writing them the bar sits at
"working..." with no error anywhere. So the events are checked here, from the CLI's own
``main``, read back with the reader the front ends use (``progress.JsonLinesTail``).
"""
from __future__ import annotations

import numpy as np

from LumbarSegmentLib.core import progress
from LumbarSegmentLib.cli.main import main
from LumbarSegmentLib.formats.io import write_volume
from LumbarSegmentLib.core.volume import Volume


def tiny_sagittal_volume(slices: int = 3, size: int = 48) -> Volume:
    """Smooth stripes on a sagittal grid (PIR: columns posterior, rows inferior, slices right), 1 mm.

    Smooth, because the CLI refuses pure noise as "not an MR image" before it segments anything.
    """
    j, i = np.mgrid[0:size, 0:size]
    plane = 200 + 150 * np.sin(j / 5.0) * np.cos(i / 7.0)
    array = np.repeat(plane[None], slices, axis=0).astype(np.int16)
    direction = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # i -> P, j -> I, k -> R (LPS)
    return Volume(array, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=direction)


def test_segment_writes_batch_events_to_the_progress_file(tmp_path, tiny_package, monkeypatch, capsys):
    src = tmp_path / "a.nii.gz"
    write_volume(tiny_sagittal_volume(), src)
    log = tmp_path / "events" / progress.PROGRESS_FILE
    monkeypatch.setenv(progress.PROGRESS_ENV, str(log))
    assert main(["segment", str(src), "-o", str(tmp_path / "a_seg.nii.gz"), "--model", str(tiny_package.path),
                 "--batch-size", "1"]) == 0
    recs = progress.JsonLinesTail(log).flush()
    batches = [r for r in recs if r["event"] == progress.BATCH]
    assert len(batches) >= 2, recs
    total = batches[0]["total"]
    assert total >= 2 and all(r["total"] == total for r in batches)
    assert [r["done"] for r in batches] == list(range(1, total + 1))  # determinate, and it ends at 100 %
    assert progress.fraction(batches[-1]) == 1.0
    assert all(r["input"] == str(src) for r in batches)
    # the terminal bar is still drawn, and its first frame already knows the total
    err = capsys.readouterr().err
    assert "0batch" not in err and f"/{total}" in err


def test_without_the_variable_no_file_is_written(tmp_path, tiny_package, monkeypatch):
    monkeypatch.delenv(progress.PROGRESS_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    src = tmp_path / "a.nii.gz"
    write_volume(tiny_sagittal_volume(), src)
    assert main(["segment", str(src), "-o", str(tmp_path / "a_seg.nii.gz"), "--model", str(tiny_package.path),
                 "--no-progress"]) == 0
    assert not list(tmp_path.rglob("*.jsonl"))
