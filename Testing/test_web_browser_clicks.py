"""Click to fix in a real Chromium: open a case with its draft, switch the tool on, click in the sagittal
view, see the segment grow and the click counted, undo it, click again and export: the case records it.

Its own ``lumbarseg web`` (the skip rules and the browser are test_web_browser.py's): the data folder holds
the shipped sample, the work folder already has a draft of it (a block of vertebral body in a corner, so
the view's centre is background), and ``--models`` offers a tiny random-weight model, so no draft runs
and a click costs the model on a few slices only.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import make_package, stop_server, wait_for_server

from test_web_browser import ARTIFACTS, SAMPLE, _free_port, _voxels, _wait_voxels, browser  # noqa: F401

VIEWPORT = {"width": 1600, "height": 1000}


def _prepare(base):
    """Data, a draft of the sample in the work folder, and a registry whose default is a tiny model."""
    from LumbarSegmentLib.core.schema import load_schema
    from LumbarSegmentLib.formats.io import read_volume
    from LumbarSegmentLib.registry.catalog import Catalog
    from LumbarSegmentLib.registry.registry import Registry
    from LumbarSegmentLib.slicer import mrml

    (base / "data").mkdir()
    shutil.copy(SAMPLE, base / "data" / SAMPLE.name)
    (base / "work" / "drafts").mkdir(parents=True)
    ctx = mrml.MRMLContext.standalone()
    vol = read_volume(SAMPLE)
    node = mrml.volume_to_node(ctx.scene, vol, "VB2_06")
    labels = np.zeros(vol.shape, np.uint8)
    labels[:12, :12, :] = 1
    seg = mrml.labels_to_segmentation(ctx.scene, ctx.seg_logic, vol.with_array(labels), load_schema("starter"), node)
    mrml.save_seg_nrrd(ctx.scene, seg, base / "work" / "drafts" / "VB2_06.seg.nrrd")
    registry = Registry(base / "models")
    registry.publish(make_package(base / "pkg" / "uvd-tiny"), make_default=True, catalog=Catalog.around(registry))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("web-clicks")
    _prepare(base)
    port = _free_port()
    env = dict(os.environ, VTK_DEFAULT_OPENGL_WINDOW="vtkEGLRenderWindow", LUMBARSEG_HOME=str(base / "home"))
    log = open(base / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "LumbarSegmentLib.cli.main", "web", "--port", str(port),
                             "--data", str(base / "data"), "--work", str(base / "work"), "--models",
                             str(base / "models"), "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT,
                            env=env, cwd=base)
    url = f"http://127.0.0.1:{port}/"
    wait_for_server(proc, url, base / "server.log", log)
    yield {"url": url, "work": base / "work", "log": base / "server.log"}
    stop_server(proc, log)


def _clicks(pg) -> int:
    return int(pg.get_attribute("[data-testid=click-status]", "data-clicks"))


def _click_centre(pg):
    box = pg.locator("img.image-display-area").first.bounding_box()
    pg.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)


def test_click_to_fix_changes_the_segmentation_counts_the_click_and_the_export_records_it(browser, server):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    pg = browser.new_page(viewport=VIEWPORT)
    try:
        pg.goto(server["url"])
        pg.wait_for_selector("[data-testid=case-VB2_06]", timeout=60_000)
        pg.click("[data-testid=case-VB2_06]")
        sid = "vertebral_body"
        pg.wait_for_selector(f"tr[data-testid=segment-{sid}]", timeout=30_000)
        drafted = _voxels(pg, sid)
        for tid in ("click-toggle", "wl-preset", "readiness"):  # still all on a desktop screen
            box = pg.locator(f"[data-testid={tid}]").bounding_box()
            assert box and box["y"] + box["height"] <= VIEWPORT["height"], (tid, box)

        pg.click(f"tr[data-testid=segment-{sid}] td:nth-child(2)")
        pg.click("[data-testid=click-toggle]")
        pg.wait_for_selector("[data-testid=click-status]", timeout=20_000)
        assert pg.get_attribute("[data-testid=click-toggle]", "data-on") == "true"
        _click_centre(pg)
        grown = _wait_voxels(pg, sid, lambda n: n > drafted, "click to fix", timeout=30)
        pg.wait_for_function("document.querySelector('[data-testid=click-status]').dataset.clicks === '1'",
                             timeout=10_000)
        pg.screenshot(path=str(ARTIFACTS / "20_click_to_fix.png"))

        pg.click("[data-testid=click-undo]")
        _wait_voxels(pg, sid, lambda n: n == drafted, "undo click")
        assert _clicks(pg) == 1  # the effort was spent: it stays counted

        _click_centre(pg)
        _wait_voxels(pg, sid, lambda n: n == grown, "the same click again")
        pg.click("[data-testid=export]")
        pg.wait_for_selector("[data-testid=export-result]", timeout=60_000)
        case = json.loads(sorted((server["work"] / "cases").glob("VB2_06*.json"))[-1].read_text())
        assert case["effort"]["clicks"] == 2 and case["effort"]["voxels_by_clicks"] == 2 * (grown - drafted)
        assert sid in case["edited_structures"]
    finally:
        pg.close()
