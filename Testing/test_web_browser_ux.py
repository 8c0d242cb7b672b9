"""The annotator's day in a real Chromium: layout at a desktop size, readouts, keys, window/level,
stale state when another case opens, the small-team retrain warning, Stop and Resume.

Same server and browser as test_web_browser.py (its fixtures and skip rules), at 1600x1000.
Screenshots go to Testing/artifacts/web/ (not committed); docs/img/ holds copies of a few.
"""
from __future__ import annotations

import time

import pytest

from test_web_browser import ARTIFACTS, SAMPLE, _stroke, _voxels, _wait_voxels, browser, server  # noqa: F401

VIEWPORT = {"width": 1600, "height": 1000}


@pytest.fixture(scope="module")
def page(browser, server):  # noqa: F811 - one page for the whole day, in order
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    pg = browser.new_page(viewport=VIEWPORT)
    pg.goto(server["url"])
    pg.wait_for_selector("[data-testid=upload] input[type=file]", state="attached", timeout=60_000)
    yield pg
    pg.close()


def _upload(pg, path, case_id):
    pg.locator("[data-testid=upload] input[type=file]").set_input_files(str(path))
    pg.wait_for_function(f"document.querySelector('[data-testid=case-title]').textContent.includes('{case_id}')",
                         timeout=60_000)


def _readout(pg, name) -> int:
    return int(pg.get_attribute(f"[data-testid=readout-{name}]", "data-index"))


def _until(what, ok, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        value = ok()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.25)


def _value(pg, name) -> float:
    return float(pg.input_value(f"[data-testid={name}-value] input"))


def _settled(pg, name, quiet=0.75, timeout=10.0) -> float:
    """The value once it has stopped changing for ``quiet`` seconds: a drag's last moves may still be on
    their way to the server (and back) when its first effect is seen."""
    last, since, deadline = _value(pg, name), time.monotonic(), time.monotonic() + timeout
    while time.monotonic() - since < quiet and time.monotonic() < deadline:
        time.sleep(0.15)
        now = _value(pg, name)
        if now != last:
            last, since = now, time.monotonic()
    return last


def _shot(pg, name):
    pg.screenshot(path=str(ARTIFACTS / name))


def test_1_layout_readouts_and_footer(page):
    _upload(page, SAMPLE, "VB2_06")
    page.wait_for_selector("[data-testid=readout-Sagittal]", timeout=20_000)
    # everything an annotator needs is on screen at 1600x1000, nothing scrolled
    for tid in ("segments", "export", "retrain", "readiness", "tool-threshold", "window-slider", "wl-preset"):
        box = page.locator(f"[data-testid={tid}]").bounding_box()
        assert box and box["y"] >= 0 and box["y"] + box["height"] <= VIEWPORT["height"], (tid, box)
    # the tool buttons sit in two rows of four, none clipped
    clipped = page.evaluate("""[...document.querySelectorAll('[data-testid^=tool-]')].filter(
        b => b.scrollWidth > b.clientWidth + 1).map(b => b.dataset.testid)""")
    assert clipped == []
    rows = page.evaluate("""new Set([...document.querySelectorAll('[data-testid^=tool-]')].map(
        b => Math.round(b.getBoundingClientRect().top))).size""")
    assert rows == 2
    # each view: its name, slice number of the count, position; the sagittal view's edges
    for name in ("Sagittal", "Axial", "Coronal"):
        text = page.text_content(f"[data-testid=readout-{name}]")
        assert name in text and "slice" in text and "mm" in text, text
    assert page.get_attribute("[data-testid=readout-Sagittal]", "data-count") == "54"
    edges = {e: page.text_content(f"[data-testid=edge-Sagittal-{e}]").strip() for e in ("left", "right", "top",
                                                                                         "bottom")}
    assert edges == {"left": "A", "right": "P", "top": "S", "bottom": "I"}
    footer = page.text_content("[data-testid=footer]")
    assert "trame-slicer" in footer and "annotation page" in footer and "(c) 2025" not in footer
    assert page.input_value("[data-testid=upload] input[type=file]") == ""  # the upload box is empty again
    _shot(page, "ux_01_layout.png")


def test_2_slice_keys_and_help(page):
    box = page.locator("img.image-display-area").first.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5)
    first = _readout(page, "Sagittal")
    page.keyboard.press("ArrowUp")
    _until("ArrowUp", lambda: _readout(page, "Sagittal") == first + 1)
    page.keyboard.press("PageDown")
    _until("PageDown", lambda: _readout(page, "Sagittal") == first - 4)
    page.keyboard.press("?")
    page.wait_for_selector("[data-testid=keys-help]", timeout=10_000)
    assert "Ctrl+Z" in page.text_content("[data-testid=keys-help]")
    _shot(page, "ux_02_keys.png")
    page.keyboard.press("Escape")
    page.wait_for_selector("[data-testid=keys-help]", state="hidden", timeout=10_000)


def test_3_window_level_drag_click_and_presets(page):
    box = page.locator("img.image-display-area").first.bounding_box()
    w0, l0 = _value(page, "window"), _value(page, "level")
    x, y = box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5
    page.mouse.move(x, y)
    page.mouse.down()
    for k in range(1, 11):  # right and up, as in Slicer: wider window, higher level
        page.mouse.move(x + 15 * k, y - 8 * k)
        time.sleep(0.05)
    page.mouse.up()
    _until("drag W/L", lambda: _value(page, "window") > w0 and _value(page, "level") > l0)
    # one click on the slider sets the value there (no drag needed)
    before = _settled(page, "window")
    slider = page.locator("[data-testid=window-slider] .v-slider-track").bounding_box()
    page.mouse.click(slider["x"] + slider["width"] * 0.2, slider["y"] + slider["height"] / 2)
    _until("slider click", lambda: _value(page, "window") < before - 1)
    page.click("[data-testid=wl-preset]")
    page.click(".v-overlay .v-list-item:has-text('High contrast')")
    _until("preset", lambda: _value(page, "window") > 0 and page.text_content("[data-testid=wl-preset]")
           .find("High contrast") >= 0)
    page.click("[data-testid=auto-wl]")
    _until("auto W/L", lambda: abs(_value(page, "window") - w0) < 1)
    _shot(page, "ux_03_window_level.png")


def test_4_draft_progress_shortcut_edit_and_export(page, server):  # noqa: F811
    page.click("[data-testid=segment]")
    page.wait_for_selector("[data-testid=job-eta]", timeout=20_000)
    # elapsed seconds while it runs (and an estimate once batches report), the time taken at the end
    _until("elapsed time", lambda: " s" in (page.text_content("[data-testid=job-eta]") or ""))
    page.wait_for_function("['done', 'failed'].includes(document.querySelector('[data-testid=job]').dataset.state)",
                           timeout=240_000)
    assert page.get_attribute("[data-testid=job]", "data-state") == "done", page.text_content("[data-testid=job]")
    sid = "vertebral_body"
    page.wait_for_selector(f"tr[data-testid=segment-{sid}]", timeout=20_000)
    drafted = _voxels(page, sid)
    page.click(f"tr[data-testid=segment-{sid}] td:nth-child(2)")
    box = page.locator("img.image-display-area").first.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5)
    page.keyboard.press("p")
    page.wait_for_function("document.querySelector('[data-testid=tool-paint]').className.includes('active')",
                           timeout=10_000)
    page.keyboard.press("]")
    _until("brush ]", lambda: "6 mm" in page.text_content("[data-testid=brush-value]"))
    _stroke(page, 0.25, 0.40, 0.45)
    painted = _wait_voxels(page, sid, lambda n: n > drafted + 50, "paint")
    page.keyboard.press("Control+z")
    _wait_voxels(page, sid, lambda n: n == drafted, "Ctrl+Z")
    page.keyboard.press("Control+y")
    _wait_voxels(page, sid, lambda n: n == painted, "Ctrl+Y")
    _shot(page, "ux_04_corrected.png")
    page.click("[data-testid=export]")
    page.wait_for_selector("[data-testid=export-result]", timeout=60_000)
    _until("exported chip", lambda: "exported" in page.text_content("[data-testid=case-VB2_06]"))


def test_5_small_team_retrain_warns_then_stop_and_resume(page):
    assert "option to choose" in page.text_content("[data-testid=readiness]")
    page.click("[data-testid=retrain]")
    page.wait_for_selector("[data-testid=retrain-warning]", timeout=10_000)
    warning = page.text_content("[data-testid=retrain-warning]")
    assert "held out" in warning and "not as the default" in warning
    assert page.get_attribute("[data-testid=retrain-status]", "data-state") == "idle"  # nothing started yet
    _shot(page, "ux_05_retrain_warning.png")
    page.click("[data-testid=retrain-anyway]")
    page.wait_for_function("document.querySelector('[data-testid=retrain-status]').dataset.state === 'running'",
                           timeout=20_000)
    time.sleep(2)
    page.click("[data-testid=stop-retrain]")
    page.wait_for_function("document.querySelector('[data-testid=retrain-status]').dataset.state === 'cancelled'",
                           timeout=60_000)
    resume = page.locator("[data-testid=resume]")
    _until("Resume enabled", lambda: resume.is_enabled())
    _shot(page, "ux_06_stopped.png")
    resume.click()
    page.wait_for_function("document.querySelector('[data-testid=retrain-status]').dataset.state === 'running'",
                           timeout=20_000)
    page.click("[data-testid=stop-retrain]")
    page.wait_for_function("document.querySelector('[data-testid=retrain-status]').dataset.state === 'cancelled'",
                           timeout=60_000)


def _another_volume(path) -> None:
    """The sample with one voxel changed: another image, so the page does not reopen the earlier upload
    of the same bytes (an upload of identical bytes opens the case already uploaded)."""
    from LumbarSegmentLib.formats.io import read_volume, write_volume

    vol = read_volume(SAMPLE)
    vol.array.flat[0] = vol.array.flat[0] + 1
    write_volume(vol, path)


def test_6_another_case_leaves_nothing_stale_and_filters(page, server, tmp_path):  # noqa: F811
    data = server["work"].parent / "data"  # the server's --data folder: 30 more cases to list
    for i in range(30):
        (data / f"A{i:02d}_image.mha").symlink_to(SAMPLE)
    other = tmp_path / "Other_01_image.mha"
    _another_volume(other)
    assert page.get_attribute("[data-testid=job]", "data-state") == "done"
    _upload(page, other, "Other_01")
    # the open case is the 31st of 32: the list scrolls to keep it in sight
    _until("open case in view", lambda: page.evaluate("""(() => {
        const list = document.querySelector('[data-testid=cases]');
        const item = list.querySelector('.v-list-item--active');
        const l = list.getBoundingClientRect(), a = item.getBoundingClientRect();
        return list.scrollTop > 0 && a.top >= l.top - 1 && a.bottom <= l.bottom + 1; })()"""))
    assert page.get_attribute("[data-testid=job]", "data-state") == "idle"
    assert "VB2_06" not in (page.text_content("[data-testid=job]") or "")
    assert page.locator("[data-testid=export-result]").count() == 0
    assert page.input_value("[data-testid=upload] input[type=file]") == ""
    page.click("[data-testid=filter-exported]")
    _until("filter", lambda: page.locator("[data-testid=cases] [data-testid^=case-]").count() == 1)
    assert page.locator("[data-testid=case-VB2_06]").count() == 1
    page.click("[data-testid=filter-new]")
    _until("filter new", lambda: page.locator("[data-testid=case-Other_01]").count() == 1
           and page.locator("[data-testid=case-VB2_06]").count() == 0)
    page.click("[data-testid=filter-all]")
    _shot(page, "ux_07_second_case.png")
