"""LumbarSegment: lumbar-spine MRI segmentation in 3D Slicer. A thin shell over LumbarSegmentLib."""
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import qt
import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

_HERE = Path(__file__).resolve().parent  # installed: LumbarSegmentLib and Resources sit beside this file
_ROOT = _HERE if (_HERE / "LumbarSegmentLib").is_dir() else _HERE.parent  # source tree: one level up
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))
RESOURCES = _ROOT / "Resources"

from LumbarSegmentLib.inference.options import SegmentOptions  # noqa: E402
from LumbarSegmentLib.slicer.logic import (CANCELLED, DONE, FAILED, RUNNING, ModuleLogic,  # noqa: E402
                                           SegmentRequest, self_test_loop)

# The "Advanced" section: parameter -> segment option; choices, ranges, defaults and tooltips are the options' own.
ADVANCED = {"precision": "precision", "sliceSmoothing": "slice_smoothing_mm", "bnAdapt": "bn_adapt",
            "postprocess": "postprocess", "tile": "tile", "overlap": "overlap", "runtime": "runtime", "roi": "roi",
            "sliceStep": "slice_step"}
_OPTION, _DEFAULT = SegmentOptions.options(), SegmentOptions.default


class LumbarSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "LumbarSegment"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["LumbarSegment developers"]
        self.parent.helpText = (
            "Segments sagittal lumbar-spine MR volumes (vertebrae, discs, spinal canal, ...) with U-Net models, "
            "lets you correct the result in the Segment Editor, exports corrected cases and retrains on them. "
            "See docs/user_guide.md in the LumbarSegment repository.")
        self.parent.acknowledgementText = (
            "Models follow J. J. Sáenz-Gamboa, M. de la Iglesia-Vayá, J. A. Gómez, \"Automatic semantic "
            "segmentation of structural elements related to the spinal cord in the lumbar region by using "
            "convolutional neural networks\", ICPR 2020.")
        icon = RESOURCES / "Icons" / "LumbarSegment.png"
        if icon.exists():
            self.parent.icon = qt.QIcon(str(icon))
        app = getattr(slicer, "app", None)  # None only where the module file is imported outside Slicer
        if app is not None:
            app.connect("startupCompleted()", loadTerminology)


def loadTerminology():
    """Register LumbarSegment's terminology context, so that Slicer's terminology selector knows the
    codes the models' segments carry (Slicer's bundled lists lack some, e.g. "Vertebral body")."""
    from LumbarSegmentLib.core.terminology import terminology_file

    slicer.modules.terminologies.logic().LoadTerminologyFromFile(str(terminology_file()))


@parameterNodeWrapper
class LumbarSegmentParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    device: Annotated[str, Choice(["auto", "cpu", "cuda", "mps"])] = "auto"
    mode: Annotated[str, Choice(["fast", "tta", "ensemble"])] = "fast"
    confidence: bool = False
    levels: bool = False
    allowReslice: bool = False
    updateUnedited: bool = False
    precision: Annotated[str, Choice(list(_OPTION["precision"].choices))] = _DEFAULT("precision")
    sliceSmoothing: Annotated[float, WithinRange(_OPTION["slice_smoothing_mm"].lo,
                                                 _OPTION["slice_smoothing_mm"].hi)] = _DEFAULT("slice_smoothing_mm")
    bnAdapt: Annotated[float, WithinRange(_OPTION["bn_adapt"].lo, _OPTION["bn_adapt"].hi)] = _DEFAULT("bn_adapt")
    postprocess: Annotated[str, Choice(list(_OPTION["postprocess"].choices))] = _DEFAULT("postprocess")
    tile: str = str(_DEFAULT("tile"))
    overlap: Annotated[float, WithinRange(_OPTION["overlap"].lo, _OPTION["overlap"].hi)] = _DEFAULT("overlap")
    runtime: Annotated[str, Choice(list(_OPTION["runtime"].choices))] = _DEFAULT("runtime")
    roi: bool = _DEFAULT("roi")
    sliceStep: Annotated[int, WithinRange(_OPTION["slice_step"].lo, _OPTION["slice_step"].hi)] = _DEFAULT("slice_step")
    exportFolder: Path = Path.home() / "LumbarSegment" / "dataset"
    caseId: str = ""
    datasetFolder: Path = Path.home() / "LumbarSegment" / "dataset"
    fromScratch: bool = False
    epochs: int = 15
    maxMinutes: int = 0


class LumbarSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self._parameterNode, self._guiConnection = None, None
        self._segmenting = self._training = False
        self._lastMetrics = ""
        self._clickObservations = []  # (interactor, tag) of the slice views while click to fix is on
        self._measured = []  # the levels table's last measurements (rows of the --measurements CSV)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(str(RESOURCES / "UI" / "LumbarSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = LumbarSegmentLogic()
        self.refreshModels()
        self.timer = qt.QTimer()
        self.timer.setInterval(250)
        self.timer.connect("timeout()", self.onTimer)
        for button, slot in ((self.ui.segmentButton, self.onSegment), (self.ui.cancelButton, self.onCancel),
                             (self.ui.segmentEditorButton, self.onSegmentEditor), (self.ui.exportButton, self.onExport),
                             (self.ui.retrainStartButton, self.onRetrainStart),
                             (self.ui.retrainStopButton, self.onRetrainStop),
                             (self.ui.retrainResumeButton, self.onRetrainResume),
                             (self.ui.clickUndoButton, self.onClickUndo),
                             (self.ui.levelsUpButton, lambda: self.onShiftLevels(-1)),
                             (self.ui.levelsDownButton, lambda: self.onShiftLevels(1)),
                             (self.ui.measureLevelsButton, self.onMeasureLevels),
                             (self.ui.saveMeasurementsButton, self.onSaveMeasurements)):
            button.connect("clicked(bool)", lambda _=False, s=slot: s())
        self.ui.datasetPathLineEdit.connect("currentPathChanged(QString)", self.onDatasetChanged)
        self.ui.clickToFixButton.connect("toggled(bool)", self.onClickToFix)
        self.ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", lambda *_: self.refreshLevels())
        for widget in self.ui.advancedCollapsibleButton.findChildren(qt.QWidget):
            if widget.property("SlicerParameterName") in ADVANCED:
                widget.toolTip = _OPTION[ADVANCED[widget.property("SlicerParameterName")]].help
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent,
                         lambda *a: (self._endClicks(), self.onCancel()))
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, lambda *a: self.initializeParameterNode())
        self.initializeParameterNode()
        self.reattachTraining()

    def cleanup(self):
        # Training is left running: it lives in its own process and run folder, and the next
        # panel (a module reload, or Slicer started again) reattaches to it.
        self.removeObservers()
        self._endClicks()
        self.timer.stop()
        self.logic.core.cancel_segmentation()

    def reattachTraining(self):
        with slicer.util.tryWithErrorDisplay("Could not follow the earlier training run."):
            st = self.logic.core.reattach_retrain()
            if st is None:
                return
            self.ui.metricsTextEdit.setPlainText(f"Earlier run: {st.message}")
            self._setTraining(st.state == RUNNING)
            self.ui.retrainResumeButton.enabled = st.state == CANCELLED

    def enter(self):
        self.initializeParameterNode()

    def initializeParameterNode(self):
        if self._guiConnection:
            self._parameterNode.disconnectGui(self._guiConnection)
        self._parameterNode = self.logic.getParameterNode()
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        self._guiConnection = self._parameterNode.connectGui(self.ui)

    def status(self, text):
        self.ui.statusLabel.text = text

    def refreshModels(self):
        self.ui.modelComboBox.clear()
        for label, ref in self.logic.core.model_choices():
            self.ui.modelComboBox.addItem(label, ref)

    def onSegment(self):
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Could not start the segmentation.", waitCursor=True):
            installed = self.logic.core.ensure_dependencies(slicer.util.confirmOkCancelDisplay)
            if installed.restart_required:
                if slicer.util.confirmYesNoDisplay(installed.message + "\n\nRestart Slicer now?"):
                    slicer.util.restart()
                return
            ref = self.ui.modelComboBox.currentData
            request = SegmentRequest.of(models=[ref] if ref and p.mode != "ensemble" else None, levels=p.levels,
                                        device=p.device, mode=p.mode, confidence=p.confidence,
                                        allow_reslice=p.allowReslice,
                                        **{option: getattr(p, name) for name, option in ADVANCED.items()})
            notes = self.logic.core.start_segmentation(p.inputVolume, request,
                                                       p.segmentation if p.updateUnedited else None)
            self.status("Segmenting..." + "".join(f"\nNote: {n}" for n in notes))
            self.ui.cancelButton.enabled, self.ui.segmentButton.enabled = True, False
            self._segmenting = True
            self.timer.start()

    def onCancel(self):
        if self._segmenting:
            self.logic.core.cancel_segmentation()
            self._segmenting = False
            self.ui.cancelButton.enabled, self.ui.segmentButton.enabled = False, True
            self.status("Segmentation cancelled")

    def onTimer(self):
        core = self.logic.core
        if self._segmenting:
            st = core.poll_segmentation()
            self.ui.progressBar.value = int(100 * (st.fraction or 0))
            self.status(st.message + "".join(f"\nWarning: {w}" for w in st.warnings))
            if st.finished:
                self._segmenting = False
                self.ui.cancelButton.enabled, self.ui.segmentButton.enabled = False, True
                if st.state == DONE:
                    with slicer.util.tryWithErrorDisplay("Could not add the segmentation to the scene."):
                        self._parameterNode.segmentation, info = core.finish_segmentation()
                        self.status(info["summary"])
                        self.refreshLevels()
                    if self._parameterNode.segmentation and self.ui.levelsTableWidget.rowCount:
                        self.onMeasureLevels()  # a draft with levels: its table is measured at once
                elif st.state == FAILED:
                    slicer.util.errorDisplay(f"Segmentation failed: {st.message}")
        if self._training:
            st = core.poll_retrain()
            self.ui.retrainProgressBar.value = int(100 * (st.fraction or 0))
            if st.message != self._lastMetrics:
                self._lastMetrics = st.message
                self.ui.metricsTextEdit.appendPlainText(st.message)
            if st.finished:
                self._setTraining(False)
                table = (self.logic.core.trainer.publish_event or {}).get("table")
                if table:  # the gate's per-class comparison with the model in use
                    self.ui.metricsTextEdit.appendPlainText(table)
                self.ui.retrainResumeButton.enabled = st.state == CANCELLED
                self.status(st.message)
                self.refreshModels()
        if not (self._segmenting or self._training):
            self.timer.stop()

    def onShiftLevels(self, steps):
        with slicer.util.tryWithErrorDisplay("Could not rename the levels.", waitCursor=True):
            names = self.logic.core.shift_level_names(self._parameterNode.segmentation, steps)
            self.status("Levels: " + " ".join(names))
        if self._measured:  # the rows are keyed by level name: measure again under the new names
            self.onMeasureLevels()
        else:
            self.refreshLevels()

    def refreshLevels(self, measured=None):
        """Fill the levels table from the selected segmentation: names and flags, and the measurements if any."""
        from LumbarSegmentLib.slicer.level_table import COLUMNS, table_rows

        self._measured = list(measured or [])
        seg = self._parameterNode.segmentation if self._parameterNode else None
        rows = table_rows(seg, self._measured)
        table = self.ui.levelsTableWidget
        table.clear()
        table.setColumnCount(len(COLUMNS))
        table.setRowCount(len(rows))
        table.setHorizontalHeaderLabels([header for _, header in COLUMNS])
        for r, row in enumerate(rows):
            for c, (key, _) in enumerate(COLUMNS):
                table.setItem(r, c, qt.QTableWidgetItem(row[key]))
        self.ui.saveMeasurementsButton.enabled = bool(self._measured)

    def onMeasureLevels(self):
        """Measure the level segments of the selected segmentation (a draft or a manual one) on the input volume."""
        from LumbarSegmentLib.slicer.level_table import measure_segmentation

        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Could not measure the levels.", waitCursor=True):
            self.refreshLevels(measure_segmentation(p.segmentation, p.inputVolume))
            self.status(f"Measured {len(self._measured)} levels of {p.segmentation.GetName()}")

    def onSaveMeasurements(self):
        """Write the table as the --measurements CSV, where the person chooses."""
        from LumbarSegmentLib.slicer.level_table import save_csv

        seg = self._parameterNode.segmentation
        suggested = Path.home() / f"{seg.GetName() if seg else 'levels'}_measurements.csv"
        path = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), "Save level measurements",
                                              str(suggested), "CSV table (*.csv)")
        if not path:
            return
        path = path if path.lower().endswith(".csv") else path + ".csv"
        with slicer.util.tryWithErrorDisplay("Could not save the measurements.", waitCursor=True):
            self.status(f"Measurements saved to {save_csv(self._measured, path)}")

    def onSegmentEditor(self):
        seg, vol = self._parameterNode.segmentation, self._parameterNode.inputVolume
        if seg:
            self.logic.core.watch(seg, vol)  # the effort ledger counts the edits made there
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        if seg:
            editor.setSegmentationNode(seg)
            getattr(editor, "setSourceVolumeNode", getattr(editor, "setMasterVolumeNode", None))(vol)

    # --- click to fix: left click adds to the selected segment's structure, Shift/Ctrl+left click removes
    def onClickToFix(self, on):
        """Switch the tool on for the chosen volume and segmentation (the model is the one picked above)."""
        if not on:
            self._endClicks()
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Could not start click to fix.", waitCursor=True):
            structures = self.logic.core.clicks.start(p.inputVolume, p.segmentation,
                                                      self.ui.modelComboBox.currentData or None)
            self._observeSliceViews()
            self.ui.clickStatusLabel.text = (f"Select a segment ({', '.join(structures)}) in the Segment Editor, "
                                             f"then click in a slice view: left click adds, Shift+click removes")
            return
        self.ui.clickToFixButton.checked = False

    def _observeSliceViews(self):
        """Watch left clicks in every slice view, ahead of the view's own handling (higher priority)."""
        self._forgetSliceViews()
        manager = slicer.app.layoutManager()
        for name in manager.sliceViewNames():
            widget = manager.sliceWidget(name)
            interactor = widget.sliceView().interactorStyle().GetInteractor()
            holder = []
            tag = interactor.AddObserver("LeftButtonPressEvent",
                                         lambda caller, event, w=widget, h=holder: self.onSliceClick(w, caller, h[0]),
                                         2.0)
            holder.append(tag)
            self._clickObservations.append((interactor, tag))

    def _forgetSliceViews(self):
        for interactor, tag in self._clickObservations:
            interactor.RemoveObserver(tag)
        self._clickObservations = []

    def _endClicks(self):
        self._forgetSliceViews()
        self.logic.core.clicks.stop()
        if self.ui.clickToFixButton.checked:
            self.ui.clickToFixButton.checked = False

    def onSliceClick(self, sliceWidget, interactor, tag):
        """One click to fix; the press is consumed so that no window/level drag or effect starts with it."""
        x, y = interactor.GetEventPosition()
        positive = not (interactor.GetShiftKey() or interactor.GetControlKey())
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        with slicer.util.tryWithErrorDisplay("Click to fix failed.", waitCursor=True):
            xyToRas = sliceWidget.sliceLogic().GetSliceNode().GetXYToRAS()
            changed = self.logic.core.clicks.click_in_view(xyToRas, x, y, editor.currentSegmentID(), positive)
            effort = self.logic.core.clicks.effort(self._parameterNode.segmentation) or {}
            self.ui.clickStatusLabel.text = (f"{'Added' if positive else 'Removed'}: {changed} voxels changed "
                                             f"(clicks on this segmentation: {effort.get('clicks', 0)})")
        interactor.GetCommand(tag).SetAbortFlag(1)

    def onClickUndo(self):
        with slicer.util.tryWithErrorDisplay("Could not undo the click.", waitCursor=True):
            undone = self.logic.core.clicks.undo()
            self.ui.clickStatusLabel.text = "Last click undone" if undone else "No click to undo"

    def onExport(self):
        p = self._parameterNode
        warning = self.logic.core.export_warning(p.segmentation)
        if warning and not slicer.util.confirmOkCancelDisplay(warning):
            return
        with slicer.util.tryWithErrorDisplay("Export failed.", waitCursor=True):
            case = self.logic.core.export(p.inputVolume, p.segmentation, p.exportFolder, p.caseId.strip())
            edited = case.extra.get("edited_structures") or ["none"]
            self.status(f"Exported {case.case_id} version {case.version} to {case.json_path.parent} "
                        f"(edited: {', '.join(edited)})")

    def onRetrainStart(self):
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Could not start training.", waitCursor=True):
            installed = self.logic.core.ensure_dependencies(slicer.util.confirmOkCancelDisplay)
            if installed.restart_required:
                if slicer.util.confirmYesNoDisplay(installed.message + "\n\nRestart Slicer now?"):
                    slicer.util.restart()
                return
            if not self._readinessAccepted(p.datasetFolder):
                return
            base = None if p.fromScratch else (self.ui.modelComboBox.currentData or None)
            out = self.logic.core.start_retrain(p.datasetFolder, base_model=base, epochs=p.epochs,
                                                max_minutes=p.maxMinutes or None)
            self.ui.metricsTextEdit.setPlainText(f"Training into {out} ({'from scratch' if base is None else 'from ' + base})")
            self._setTraining(True)

    def onDatasetChanged(self, folder):
        """Say where the chosen dataset folder stands before anyone starts a retrain."""
        from LumbarSegmentLib.dataset.readiness import readiness

        if folder:
            self.ui.retrainReadinessLabel.text = readiness(folder).message()

    def _readinessAccepted(self, dataset) -> bool:
        """Say before training whether the result can replace the model in use (LumbarSegmentLib.dataset.readiness)."""
        from LumbarSegmentLib.dataset.readiness import readiness

        r = readiness(dataset)
        self.ui.retrainReadinessLabel.text = r.message()
        if r.can_start and not r.can_replace:
            return slicer.util.confirmOkCancelDisplay(r.message() + "\n\nStart training anyway?")
        return True

    def onRetrainStop(self):
        self.logic.core.stop_retrain()
        self.ui.retrainResumeButton.enabled = True

    def onRetrainResume(self):
        with slicer.util.tryWithErrorDisplay("Could not resume training."):
            self.logic.core.resume_retrain()
            self._setTraining(True)

    def _setTraining(self, running):
        self._training = running
        self.ui.retrainStartButton.enabled, self.ui.retrainStopButton.enabled = not running, running
        if running:
            self.ui.retrainResumeButton.enabled = False
            self.timer.start()


class LumbarSegmentLogic(ScriptedLoadableModuleLogic):
    """Hands the application's scene and Segmentations logic to LumbarSegmentLib; nothing else."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.core = ModuleLogic(slicer.mrmlScene, slicer.modules.segmentations.logic())

    def getParameterNode(self):
        return LumbarSegmentParameterNode(super().getParameterNode())


class LumbarSegmentTest(ScriptedLoadableModuleTest):
    """The loop in the running application: segment (or a synthetic draft), edit, export, read back."""

    def runTest(self):
        slicer.mrmlScene.Clear()
        self.test_loop()

    def test_loop(self):
        with tempfile.TemporaryDirectory() as folder:
            case = self_test_loop(LumbarSegmentLogic().core, folder)
        self.assertEqual(len(case.extra["edited_structures"]), 1)
        self.delayDisplay("LumbarSegment loop passed")
