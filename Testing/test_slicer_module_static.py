"""The Slicer module outside Slicer: .ui consistency, imports with stand-ins, delegation, CMake lists.

Only ``qt``, ``slicer.ScriptedLoadableModule`` and ``slicer.parameterNodeWrapper`` are
replaced by small stand-ins (and only when desktop Slicer is not the interpreter); the
MRML scene and Segmentations logic handed to the module's Logic are real (slicer-core).
"""
from __future__ import annotations

import ast
import importlib.util
import re
import sys
import types
import unittest
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_FILE = ROOT / "LumbarSegment" / "LumbarSegment.py"
UI_FILE = ROOT / "Resources" / "UI" / "LumbarSegment.ui"
ICON_FILE = ROOT / "Resources" / "Icons" / "LumbarSegment.png"
MODULE_CMAKE = ROOT / "LumbarSegment" / "CMakeLists.txt"
TOP_CMAKE = ROOT / "CMakeLists.txt"


def ui_widgets() -> dict[str, str]:
    tree = ET.parse(UI_FILE)
    return {w.get("name"): w.get("class") for w in tree.iter("widget")}


def ui_parameter_names() -> dict[str, str]:
    out = {}
    for w in ET.parse(UI_FILE).iter("widget"):
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                out[w.get("name")] = prop.find("string").text
    return out


# ------------------------------------------------------------------------------------------------ .ui
def test_ui_parses_and_declares_its_custom_widgets():
    root = ET.parse(UI_FILE).getroot()
    assert root.tag == "ui" and root.find("widget").get("class") == "qMRMLWidget"
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used = set(ui_widgets().values())
    qt_builtin = {c for c in used if c.startswith("Q")}
    assert used - qt_builtin <= declared, f"undeclared custom widgets: {used - qt_builtin - declared}"
    names = list(ui_widgets())
    assert len(names) == len(set(names)), "widget names must be unique"


def test_every_widget_the_module_uses_exists_in_the_ui():
    source = MODULE_FILE.read_text()
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    assert used, "the module should use widgets from the .ui"
    missing = used - set(ui_widgets())
    assert not missing, f"LumbarSegment.py uses widgets missing from the .ui: {sorted(missing)}"
    for required in ("inputVolumeSelector", "modelComboBox", "deviceComboBox", "modeComboBox", "confidenceCheckBox",
                     "segmentButton", "cancelButton", "progressBar", "segmentEditorButton", "updateUneditedCheckBox",
                     "exportFolderPathLineEdit", "caseIdLineEdit", "exportButton", "datasetPathLineEdit",
                     "retrainStartButton", "retrainStopButton", "retrainProgressBar", "metricsTextEdit",
                     "statusLabel"):
        assert required in ui_widgets(), required
    assert ui_widgets()["exportFolderPathLineEdit"] == "ctkPathLineEdit"
    assert ui_widgets()["inputVolumeSelector"] == "qMRMLNodeComboBox"


def test_ui_parameter_names_match_the_parameter_node():
    tree = ast.parse(MODULE_FILE.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "LumbarSegmentParameterNode")
    fields = {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)}
    bound = set(ui_parameter_names().values())
    assert bound <= fields, f"SlicerParameterName without a parameter: {bound - fields}"
    assert {"inputVolume", "segmentation", "device", "mode", "confidence", "updateUnedited", "exportFolder",
            "caseId", "datasetFolder"} <= bound


def test_the_advanced_section_offers_exactly_the_segment_options_choices_and_ranges():
    """Precision, smoothing, BN adaptation, post-processing, tile, overlap, runtime, the box around the spine and
    the slice step:
    the widgets bound in the .ui
    offer the choices and ranges of ``SegmentOptions`` (the command line's), and the parameters the
    module maps them to are option fields."""
    from LumbarSegmentLib.inference.options import SegmentOptions

    tree = ast.parse(MODULE_FILE.read_text())
    advanced = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                    and getattr(n.targets[0], "id", "") == "ADVANCED")
    options = SegmentOptions.options()
    assert set(advanced.values()) == {"precision", "slice_smoothing_mm", "bn_adapt", "postprocess", "tile", "overlap",
                                      "runtime", "roi", "slice_step"}
    section = next(w for w in ET.parse(UI_FILE).iter("widget") if w.get("name") == "advancedCollapsibleButton")
    bound = {}
    for w in section.iter("widget"):
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.find("string").text] = w
    assert set(bound) == set(advanced)
    for param, name in advanced.items():
        w, option = bound[param], options[name]
        if w.get("class") == "QComboBox":
            assert tuple(i.find("property/string").text for i in w.findall("item")) == option.choices, param
        elif w.get("class") == "QDoubleSpinBox":
            lo, hi = (float(w.find(f"property[@name='{k}']/double").text) for k in ("minimum", "maximum"))
            assert (lo, hi) == (option.lo, option.hi), param
        elif w.get("class") == "QSpinBox":
            lo, hi = (int(w.find(f"property[@name='{k}']/number").text) for k in ("minimum", "maximum"))
            assert option.kind is int and (lo, hi) == (option.lo, option.hi), param
        elif w.get("class") == "QCheckBox":
            assert option.switch, param  # an on/off flag
        else:
            assert w.get("class") == "QLineEdit" and name == "tile"


def test_icon_is_a_128px_png():
    from PIL import Image

    with Image.open(ICON_FILE) as im:
        assert im.format == "PNG" and im.size == (128, 128)


# ------------------------------------------------------------------------------------------------ CMake
def test_cmake_lists_every_library_file():
    text = MODULE_CMAKE.read_text()
    listed = set(re.findall(r"^\s*((?:LumbarSegmentLib|training|Resources)/[\w./${}-]+)\s*$", text, re.M))
    listed = {p.replace("${MODULE_NAME}", "LumbarSegment") for p in listed}
    files = sorted(str(p.relative_to(ROOT)).replace("\\", "/")
                   for d in ("LumbarSegmentLib", "training") for p in (ROOT / d).rglob("*.py")
                   if "__pycache__" not in p.parts)
    files += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "LumbarSegmentLib" / "schemas").glob("*.json"))
    files += ["Resources/UI/LumbarSegment.ui", "Resources/Icons/LumbarSegment.png"]
    missing = [f for f in files if f not in listed]
    assert not missing, f"add these to LumbarSegment/CMakeLists.txt or the installed extension lacks them: {missing}"
    stale = [f for f in listed if not (ROOT / f).exists()]
    assert not stale, f"LumbarSegment/CMakeLists.txt lists files that do not exist: {stale}"
    assert "slicerMacroBuildScriptedModule" in text and "Resources/Models" in text
    assert "SOURCE_DIR ${PROJECT_SOURCE_DIR}" in text


def test_top_level_cmake_describes_the_extension():
    text = TOP_CMAKE.read_text()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL",
                "EXTENSION_SCREENSHOTURLS"):
        assert re.search(rf'set\({key} "[^"]+"\)', text), key
    assert 'set(EXTENSION_CATEGORY "Segmentation")' in text
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in text
    assert "add_subdirectory(LumbarSegment)" in text


def test_install_layout_matches_how_the_lib_finds_resources():
    """Installed, Resources/ sits beside LumbarSegmentLib/ exactly as in the source tree."""
    from LumbarSegmentLib.registry.package import shipped_registry_root

    assert shipped_registry_root() == ROOT / "Resources" / "Models"
    source = MODULE_FILE.read_text()
    assert '_HERE / "LumbarSegmentLib"' in source and 'RESOURCES = _ROOT / "Resources"' in source


# ------------------------------------------------------------------------------------------------ import with stand-ins
def _standins():
    """Minimal qt / ScriptedLoadableModule / parameterNodeWrapper for importing the module file."""
    mods = {}
    qt = types.ModuleType("qt")

    class QIcon:
        def __init__(self, path=""):
            self.path = path

    class QTimer:
        def setInterval(self, ms):
            self.interval = ms

        def connect(self, *a):
            pass

        def start(self):
            pass

        def stop(self):
            pass

    qt.QIcon, qt.QTimer = QIcon, QTimer
    mods["qt"] = qt

    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            pass

        def getParameterNode(self):
            raise NotImplementedError("not needed outside Slicer")

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=0):
            self.displayed = message

    for c in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
              ScriptedLoadableModuleTest):
        setattr(slm, c.__name__, c)
    mods["slicer.ScriptedLoadableModule"] = slm

    pnw = types.ModuleType("slicer.parameterNodeWrapper")

    class Choice:
        def __init__(self, choices):
            self.choices = list(choices)

    class WithinRange:
        def __init__(self, minimum, maximum):
            self.minimum, self.maximum = minimum, maximum

    def parameterNodeWrapper(cls):
        def __init__(self, node=None):
            self.parameterNode = node
        cls.__init__ = __init__
        return cls

    pnw.Choice, pnw.WithinRange, pnw.parameterNodeWrapper = Choice, WithinRange, parameterNodeWrapper
    mods["slicer.parameterNodeWrapper"] = pnw
    return mods


@pytest.fixture
def module(monkeypatch):
    slicer = pytest.importorskip("slicer", reason="slicer-core is needed for the real MRML scene")
    from LumbarSegmentLib.slicer.mrml import MRMLContext

    in_slicer = hasattr(slicer, "app")
    if not in_slicer:
        for name, mod in _standins().items():
            try:
                importlib.import_module(name)
            except ImportError:
                monkeypatch.setitem(sys.modules, name, mod)
                if name.startswith("slicer."):
                    monkeypatch.setattr(slicer, name.split(".", 1)[1], mod, raising=False)
        ctx = MRMLContext.standalone()
        monkeypatch.setattr(slicer, "mrmlScene", ctx.scene, raising=False)
        monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(
            segmentations=types.SimpleNamespace(logic=lambda: ctx.seg_logic)), raising=False)
    spec = importlib.util.spec_from_file_location("LumbarSegment_under_test", MODULE_FILE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_module_metadata(module):
    parent = types.SimpleNamespace()
    module.LumbarSegment(parent)
    assert parent.title == "LumbarSegment" and parent.categories == ["Segmentation"]
    assert parent.contributors and "Segment Editor" in parent.helpText
    for needle in ("Sáenz-Gamboa", "de la Iglesia-Vayá", "Gómez", "ICPR 2020", "lumbar region"):
        assert needle in parent.acknowledgementText
    assert str(ICON_FILE) == parent.icon.path


def test_parameter_node_defaults(module):
    from LumbarSegmentLib.inference.options import SegmentOptions

    choices = module.LumbarSegmentParameterNode.__annotations__
    assert set(choices) >= {"inputVolume", "segmentation", "device", "mode", "exportFolder", "datasetFolder"}
    assert module.LumbarSegmentParameterNode.mode == "fast"
    node, defaults = module.LumbarSegmentParameterNode, SegmentOptions()
    for param, name in module.ADVANCED.items():  # the panel starts where the command line does
        assert str(getattr(node, param)) == str(getattr(defaults, name)), param


def test_the_panel_values_become_the_same_request_the_command_line_would_get(module):
    """What onSegment hands the Lib: the advanced values (the tile as typed) through the options contract."""
    from LumbarSegmentLib.inference.options import OptionError
    from LumbarSegmentLib.slicer.logic import SegmentRequest

    node = module.LumbarSegmentParameterNode
    values = {name: getattr(node, param) for param, name in module.ADVANCED.items()}
    assert SegmentRequest.of(**values).options.to_argv() == []  # the defaults: no flag at all
    values.update(tile="256", overlap=0.5, precision="fp32")
    request = SegmentRequest.of(**values)
    assert request.options.tile == 256 and request.options.to_argv() == ["--precision", "fp32", "--tile", "256",
                                                                          "--overlap", "0.5"]
    with pytest.raises(OptionError, match="--tile 'big': use auto, patch, whole or a window size of 32-2048"):
        SegmentRequest.of(**{**values, "tile": "big"})


def test_logic_hands_scene_and_segmentations_logic_to_the_lib(module, tmp_path):
    import slicer

    from LumbarSegmentLib.dataset.cases import read_case
    from LumbarSegmentLib.slicer.logic import ModuleLogic, self_test_loop

    logic = module.LumbarSegmentLogic()
    assert isinstance(logic.core, ModuleLogic)
    assert logic.core.scene is slicer.mrmlScene
    assert logic.core.seg_logic is slicer.modules.segmentations.logic()
    case = self_test_loop(logic.core, tmp_path, use_model=False)
    assert read_case(case.json_path).case_id == "selftest"
    assert logic.core.scene.GetFirstNodeByName("synthetic sagittal segmentation") is not None


def test_module_self_test_runs_the_loop(module, monkeypatch):
    from LumbarSegmentLib.slicer import logic as slicer_logic

    monkeypatch.setattr(slicer_logic.ModuleLogic, "model_choices", lambda self: [])  # no model: synthetic draft
    test = module.LumbarSegmentTest("test_loop")
    test.test_loop()
    assert test.displayed == "LumbarSegment loop passed"


def test_lib_modules_import_without_qt():
    code = ("import sys, LumbarSegmentLib.slicer.logic, LumbarSegmentLib.slicer.deps, LumbarSegmentLib.formats.segfile; "
            "assert 'qt' not in sys.modules, 'qt imported'")
    import subprocess

    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_retrain_panel_checks_dependencies_reattaches_and_warns_before_exporting_a_draft():
    """Issue 10's panel gaps, checked in the shell's source (desktop Slicer cannot run here)."""
    tree = ast.parse(MODULE_FILE.read_text())
    methods = {n.name: ast.get_source_segment(MODULE_FILE.read_text(), n) for n in ast.walk(tree)
               if isinstance(n, ast.FunctionDef)}
    start = methods["onRetrainStart"]
    assert start.index("ensure_dependencies") < start.index("start_retrain"), "dependencies before training"
    assert "fromScratch" in start and "epochs=" in start and "max_minutes=" in start
    assert "stop_retrain" not in methods["cleanup"], "closing the panel must not kill training"
    assert "reattach_retrain" in methods["reattachTraining"] and "reattachTraining" in methods["setup"]
    assert "resume_retrain" in methods["onRetrainResume"]
    export = methods["onExport"]
    assert export.index("export_warning") < export.index(".export(")
    for w in ("fromScratchCheckBox", "epochsSpinBox", "maxMinutesSpinBox", "retrainResumeButton"):
        assert w in ui_widgets(), w


def test_click_to_fix_panel_watches_the_slice_views_and_lets_go_of_them():
    """The shell's click to fix: left clicks observed on every slice view (ahead of the view's own handling),
    Shift or Ctrl for a negative click, the observers removed when the tool, the panel or the scene closes."""
    source = MODULE_FILE.read_text()
    methods = {n.name: ast.get_source_segment(source, n) for n in ast.walk(ast.parse(source))
               if isinstance(n, ast.FunctionDef)}
    assert '"LeftButtonPressEvent"' in methods["_observeSliceViews"] and "sliceViewNames" in methods["_observeSliceViews"]
    click = methods["onSliceClick"]
    assert "GetShiftKey" in click and "GetControlKey" in click and "click_in_view" in click
    assert "GetXYToRAS" in click and "SetAbortFlag" in click and "currentSegmentID" in click
    assert "_endClicks" in methods["cleanup"] and "_endClicks" in methods["setup"]
    assert "RemoveObserver" in methods["_forgetSliceViews"] and "clicks.stop()" in methods["_endClicks"]
    assert "clicks.undo()" in methods["onClickUndo"]
    for w in ("clickToFixCollapsibleButton", "clickToFixButton", "clickUndoButton", "clickStatusLabel"):
        assert w in ui_widgets(), w


def test_a_slice_view_click_reaches_the_segmentation_through_the_shell(module, monkeypatch):
    """onSliceClick with stand-ins for the Qt/VTK view (pixel, keys, XY-to-RAS) and the Segment Editor's
    selected segment, over the real module logic and scene: the segmentation changes, the press is consumed."""
    import contextlib

    import numpy as np
    import slicer

    from test_refine import background_model, lps, phantom, truth_of

    from LumbarSegmentLib.core.schema import load_schema
    from LumbarSegmentLib.slicer import mrml

    logic = module.LumbarSegmentLogic()
    core = logic.core
    vol = phantom()
    node = mrml.volume_to_node(core.scene, vol, "MR")
    draft = truth_of(vol)
    draft[11:16] = 0
    seg = mrml.labels_to_segmentation(core.scene, core.seg_logic, vol.with_array(draft), load_schema("starter"), node)
    core.clicks.start(node, seg, background_model())
    body = next(sid for sid, c in mrml.segment_classes(seg, load_schema("starter")).items() if c.id == "vertebral_body")
    errors = []

    @contextlib.contextmanager
    def shown(message, waitCursor=False):
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - what Slicer would show in a dialog
            errors.append(f"{message} {exc}")

    monkeypatch.setattr(slicer.util, "tryWithErrorDisplay", shown)
    editor = types.SimpleNamespace(currentSegmentID=lambda: body)
    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(segmenteditor=types.SimpleNamespace(
        widgetRepresentation=lambda: types.SimpleNamespace(self=lambda: types.SimpleNamespace(editor=editor)))),
        raising=False)
    xy = np.eye(4)
    xy[:3, 3] = np.array(lps(vol, 13, 17, 20)) * [-1, -1, 1]  # pixel (0, 0) lies on the missed slices
    view = types.SimpleNamespace(sliceLogic=lambda: types.SimpleNamespace(
        GetSliceNode=lambda: types.SimpleNamespace(GetXYToRAS=lambda: xy)))
    aborted = []
    interactor = types.SimpleNamespace(GetEventPosition=lambda: (0, 0), GetShiftKey=lambda: 0, GetControlKey=lambda: 0,
                                       GetCommand=lambda tag: types.SimpleNamespace(SetAbortFlag=aborted.append))
    widget = module.LumbarSegmentWidget.__new__(module.LumbarSegmentWidget)
    widget.logic = logic
    widget.ui = types.SimpleNamespace(clickStatusLabel=types.SimpleNamespace(text=""))
    widget._parameterNode = types.SimpleNamespace(segmentation=seg)
    widget.onSliceClick(view, interactor, 7)
    assert not errors, errors
    assert aborted == [1]
    assert widget.ui.clickStatusLabel.text == "Added: 1600 voxels changed (clicks on this segmentation: 1)"
    labels = mrml.segmentation_to_labels(core.scene, core.seg_logic, seg, node, load_schema("starter")).array
    assert np.array_equal(labels, truth_of(vol))
    widget.onClickUndo()
    assert widget.ui.clickStatusLabel.text == "Last click undone"
