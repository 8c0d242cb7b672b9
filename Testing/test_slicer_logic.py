"""LumbarSegmentLib.slicer.logic and slicer_deps: controllers, process trees, progress logs, installs.

Child processes are real (small Python scripts standing in for the CLI and the trainer,
injected through the controllers' ``command`` / ``runner`` hooks), and one test runs the
real ``lumbarseg segment`` CLI end to end on a tiny model.
"""
from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from LumbarSegmentLib.slicer import logic as sl
from LumbarSegmentLib.dataset.cases import CaseError
from LumbarSegmentLib.registry.package import default_input_contract
from LumbarSegmentLib.core.schema import load_schema
from LumbarSegmentLib.slicer.deps import DependencyError, DependencyInstaller, installed_version
from LumbarSegmentLib.core.volume import Volume

SAGITTAL = np.array([[0.0, 0, 1], [1, 0, 0], [0, -1, 0]])  # PIR-like: i -> P, j -> I, k -> L


def wait_for(predicate, timeout=10.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def small_volume():
    k, j, i = np.meshgrid(np.arange(6), np.arange(40), np.arange(32), indexing="ij")  # smooth: not "noise"
    a = (50 + 45 * np.sin(j / 5.0) * np.cos(i / 7.0) + k).astype(np.int16)
    return Volume(a, spacing=(1.0, 1.0, 3.0), origin=(5.0, -2.0, 40.0), direction=SAGITTAL)


@pytest.fixture
def fake_package(tmp_path):
    """A model package folder with a manifest only: enough for the controller to learn the schema."""
    folder = tmp_path / "fake-pkg"
    folder.mkdir()
    manifest = {"format": "lumbarsegment.model", "format_version": 1, "name": "fake", "version": 1,
                "architecture": {"variant": "UD"}, "schema": load_schema("starter").to_dict(),
                "input": default_input_contract(), "weights": {"file": "weights.safetensors", "sha256": "0" * 64}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


FAKE_CLI = textwrap.dedent(r'''
    import json, os, subprocess, sys, time
    behaviour, inp, out, report, package = sys.argv[1:6]
    def batch(done, total):  # the progress contract: JSON-lines events in $LUMBARSEG_PROGRESS
        with open(os.environ["LUMBARSEG_PROGRESS"], "a") as f:
            f.write(json.dumps({"event": "batch", "done": done, "total": total}) + "\n")
    if behaviour == "fail":
        print("lumbarseg: error: cannot find model 'nope' in registries", file=sys.stderr)
        sys.exit(1)
    if behaviour == "hang":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(f"child {child.pid}", flush=True)
        batch(0, 10)
        time.sleep(60)
    from LumbarSegmentLib.formats.io import read_volume, write_volume
    v = read_volume(inp)
    for i in range(1, 5):
        batch(i, 4)
        time.sleep(0.05)
    write_volume(v.with_array((v.array > 50).astype("uint8")), out)
    with open(report, "w") as f:
        json.dump({"models": [{"ref": "fake@1", "sha256": "ab" * 32, "path": package}], "device": "cpu",
                   "timings_s": {"total": 0.2}}, f)
    print("  warning: fake engine, fake result")
''')


@pytest.fixture
def fake_cli(tmp_path):
    path = tmp_path / "fake_cli.py"
    path.write_text(FAKE_CLI)
    return path


def fake_command(script, behaviour, package):
    def command(python, inp, out, report, request, confidence=None):
        return [sys.executable, str(script), behaviour, str(inp), str(out), str(report), str(package)]
    return command


# ------------------------------------------------------------------------------------------------ parsing
def test_progress_events_round_trip_through_the_schema_module(tmp_path):
    from LumbarSegmentLib.core import progress

    log = progress.ProgressLog(tmp_path / progress.PROGRESS_FILE)
    log.write(progress.BATCH, done=9, total=20, input="x.nrrd")
    log.write(progress.STEP, epoch=1, step=5, total_steps=20, loss=float("nan"))
    with pytest.raises(ValueError, match="unknown progress event"):
        log.write("tqdm")
    recs = sl.JsonLinesTail(tmp_path / progress.PROGRESS_FILE).read_new()
    assert [progress.fraction(r) for r in recs] == [0.45, 0.25]
    assert recs[1]["loss"] is None  # strict JSON: NaN becomes null


def test_json_lines_tail_handles_partial_and_bad_lines(tmp_path):
    log = tmp_path / "progress.jsonl"
    tail = sl.JsonLinesTail(log)
    assert tail.read_new() == []  # not there yet
    with open(log, "wb") as f:
        f.write(b'{"event": "step", "epoch": 1, "step": 10, "loss": 0.9}\n{"event": "st')
    assert [r["step"] for r in tail.read_new()] == [10]  # the partial line waits
    with open(log, "ab") as f:
        f.write(b'ep", "epoch": 1, "step": 20, "loss": 0.7}\nnot json at all\n[1, 2]\n')
    assert [r["step"] for r in tail.read_new()] == [20]
    assert tail.bad_lines == 2
    with open(log, "ab") as f:  # a multi-byte character split across two writes
        f.write('{"event": "epoch", "note": "d\u00e9j'.encode()[:-1])
    assert tail.read_new() == []
    with open(log, "ab") as f:
        f.write('{"event": "epoch", "note": "d\u00e9j'.encode()[-1:] + b'a", "epoch": 2}')  # no newline at the end
    assert tail.read_new() == []
    assert tail.flush() == [{"event": "epoch", "note": "d\u00e9ja", "epoch": 2}]
    log.write_text('{"event": "step", "step": 1}\n')  # rewritten from scratch (a new run)
    assert tail.read_new() == [{"event": "step", "step": 1}]


def test_format_metrics():
    line = sl.describe({"event": "epoch", "epoch": 3, "total_epochs": 15, "step": 120, "loss": 0.43219,
                              "val": {"mean_dice_fg": 0.8123}, "eta_s": 3725})
    assert line == "epoch 3/15, step 120, loss 0.4322, mean_dice_fg 0.812, eta 1 h 02 min"
    assert sl.format_duration(42) == "42 s" and sl.format_duration(75) == "1 min 15 s"


# ------------------------------------------------------------------------------------------------ processes
def test_kill_process_tree_kills_child_and_grandchild(tmp_path):
    code = ('import time,subprocess,sys; subprocess.Popen([sys.executable,"-c","import time; time.sleep(60)"]); '
            'time.sleep(60)')
    proc = sl.BackgroundProcess([sys.executable, "-c", code], output=tmp_path / "out.log")
    assert wait_for(lambda: sl.descendants(proc.proc.pid)), "the grandchild never started"
    grandchildren = sl.descendants(proc.proc.pid)
    t0 = time.monotonic()
    proc.kill(grace=2.0)
    assert time.monotonic() - t0 < 10
    assert proc.returncode is not None
    assert wait_for(lambda: not any(sl.alive(p) for p in grandchildren), timeout=5), "grandchild survived"


def test_kill_reaches_a_grandchild_that_left_the_process_group(tmp_path):
    code = ('import time,subprocess,sys; subprocess.Popen([sys.executable,"-c","import time; time.sleep(60)"], '
            'start_new_session=True); time.sleep(60)')
    proc = sl.BackgroundProcess([sys.executable, "-c", code], output=tmp_path / "out.log")
    assert wait_for(lambda: sl.descendants(proc.proc.pid))
    escaped = sl.descendants(proc.proc.pid)
    proc.kill(grace=1.0)
    assert wait_for(lambda: not any(sl.alive(p) for p in escaped), timeout=5)


# ------------------------------------------------------------------------------------------------ segmentation
def test_segment_controller_blocking_run(fake_cli, fake_package, tmp_path):
    seen_argv = []

    def runner(argv, env, output):  # an injected runner: records, then starts the real process
        seen_argv.append(list(argv))
        from LumbarSegmentLib.slicer.jobs import LIB_PARENT

        assert str(LIB_PARENT) in env["PYTHONPATH"].split(os.pathsep) and env["LUMBARSEG_PROGRESS"]
        return sl.popen_runner(argv, env, output)

    ctl = sl.SegmentController(runner=runner, command=fake_command(fake_cli, "ok", fake_package),
                               workdir_parent=str(tmp_path))
    vol = small_volume()
    fractions = []
    run = ctl.run(vol, sl.SegmentRequest(models=["fake@1"]), progress=lambda st: fractions.append(st.fraction),
                  timeout=120)
    assert seen_argv and seen_argv[0][2] == "ok"
    assert np.array_equal(run.labels.array, (vol.array > 50).astype(np.uint8))
    assert run.labels.same_geometry(vol)
    assert run.schema.name == "starter" and run.model_ref == "fake@1" and run.model_sha256 == "ab" * 32
    assert ctl.status.state == sl.DONE and ctl.status.warnings == ["fake engine, fake result"]
    seen = [f for f in fractions if f is not None]
    assert seen[-1] == 1.0 and seen == sorted(seen)
    assert list(tmp_path.glob("lumbarseg-run-*")) == [], "the private work folder must be removed"


def test_segment_controller_reports_the_cli_error(fake_cli, fake_package, tmp_path):
    ctl = sl.SegmentController(command=fake_command(fake_cli, "fail", fake_package), workdir_parent=str(tmp_path))
    with pytest.raises(sl.ControllerError, match="cannot find model 'nope'"):
        ctl.run(small_volume(), timeout=60)
    assert ctl.status.state == sl.FAILED
    assert list(tmp_path.glob("lumbarseg-run-*")) == []


def test_segment_controller_cancel_kills_the_process_tree(fake_cli, fake_package, tmp_path):
    ctl = sl.SegmentController(command=fake_command(fake_cli, "hang", fake_package), workdir_parent=str(tmp_path))
    ctl.start(small_volume())
    with pytest.raises(sl.ControllerError):
        ctl.start(small_volume())  # one run at a time
    proc = ctl._process.proc
    assert wait_for(lambda: sl.descendants(proc.pid))
    family = [proc.pid] + sl.descendants(proc.pid)
    assert wait_for(lambda: "batch 0 of 10" in ctl.poll().message, timeout=10)
    ctl.cancel()
    assert ctl.status.state == sl.CANCELLED
    assert wait_for(lambda: not any(sl.alive(p) for p in family), timeout=5)
    assert list(tmp_path.glob("lumbarseg-run-*")) == []
    with pytest.raises(sl.ControllerError):
        ctl.result()


def test_segment_command_options():
    req = sl.SegmentRequest.of(models=["a@1", "b@2"], device="cuda", mode="ensemble", confidence=True,
                               allow_reslice=True, batch_size=4, precision="fp32", tile="256", overlap="0.5",
                               slice_smoothing_mm=2, bn_adapt=0.5, postprocess="spine")
    argv = sl.segment_command("py", Path("in.nrrd"), Path("out.nrrd"), Path("r.json"), req, Path("c.nrrd"))
    assert argv[:4] == ["py", "-m", "LumbarSegmentLib.cli.main", "segment"]
    joined = " ".join(argv)
    for part in ("--model a@1,b@2", "--device cuda", "--mode ensemble", "--confidence c.nrrd", "--reslice",
                 "--batch-size 4", "--report r.json", "--output out.nrrd"):
        assert part in joined
    assert "--model" not in sl.segment_command("py", Path("i"), Path("o"), Path("r"), sl.SegmentRequest())
    # the CLI's own parser reads what the job builds
    from LumbarSegmentLib.cli.main import build_parser

    a = build_parser().parse_args(argv[3:])
    assert (a.model, a.device, a.mode, a.confidence, a.reslice, a.batch_size, a.output, a.report) == \
        ("a@1,b@2", "cuda", "ensemble", "c.nrrd", True, 4, "out.nrrd", "r.json")
    # ... and the options it reads back are the request's (the confidence map is named by --confidence)
    from LumbarSegmentLib.inference.options import SegmentOptions

    assert SegmentOptions.from_namespace(a, confidence=a.confidence is not None) == req.options


def test_a_bad_option_is_refused_before_the_volume_is_written(tmp_path):
    from LumbarSegmentLib.inference.options import OptionError, SegmentOptions

    ctl = sl.SegmentController(workdir_parent=str(tmp_path), runner=lambda *a: pytest.fail("no process"))
    with pytest.raises(OptionError, match="--overlap 0.92: use a fraction from 0 to 0.9"):
        ctl.start(small_volume(), sl.SegmentRequest(options=SegmentOptions(overlap=0.92)))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_real_cli_end_to_end_into_a_segmentation_node(tiny_package, tmp_path):
    """The real `python -m LumbarSegmentLib.cli.main segment` on a tiny random model, through ModuleLogic."""
    pytest.importorskip("slicer", reason="slicer-core is needed for the MRML part")
    from LumbarSegmentLib.slicer import mrml

    ctx = mrml.MRMLContext.standalone()
    vol = small_volume()
    node = mrml.volume_to_node(ctx.scene, vol, "tiny")
    core = sl.ModuleLogic(ctx.scene, ctx.seg_logic, segmenter=sl.SegmentController(workdir_parent=str(tmp_path)))
    request = sl.SegmentRequest.of(models=[str(tiny_package.path)], device="cpu", threads=1)
    seg, info = core.segment(node, request, timeout=300)
    assert seg.GetName() == "tiny segmentation"
    assert info["report"]["models"][0]["sha256"] == tiny_package.sha256
    assert mrml.drafted_by(seg) == {"model": tiny_package.ref, "sha256": tiny_package.sha256}
    labels = mrml.segmentation_to_labels(ctx.scene, ctx.seg_logic, seg, node, tiny_package.schema)
    assert labels.same_geometry(vol) and labels.array.dtype == np.uint8
    assert core.segmenter.status.state == sl.DONE and core.segmenter.status.fraction == 1.0


def test_module_logic_refuses_an_axial_stack_before_starting(tmp_path):
    pytest.importorskip("slicer")
    from LumbarSegmentLib.slicer import mrml
    from LumbarSegmentLib.core.geometry import OrientationError

    ctx = mrml.MRMLContext.standalone()
    axial = Volume(np.ones((20, 64, 64), np.int16), spacing=(0.5, 0.5, 4.0))  # thick slices along S
    node = mrml.volume_to_node(ctx.scene, axial, "axial")
    started = []
    core = sl.ModuleLogic(ctx.scene, ctx.seg_logic, segmenter=type("S", (), {"start": lambda *a: started.append(a)})())
    with pytest.raises(OrientationError, match="axial"):
        core.start_segmentation(node, sl.SegmentRequest())
    assert not started
    notes = core.start_segmentation(node, sl.SegmentRequest.of(allow_reslice=True))
    assert started and "not a sagittal stack" in notes[0]


# ------------------------------------------------------------------------------------------------ retraining
FAKE_TRAINER = textwrap.dedent(r'''
    import json, sys, time
    args = sys.argv[1:]
    out = args[args.index("--out") + 1]
    behaviour = args[-1]
    log = open(out + "/progress.jsonl", "a")
    def write(rec, newline=True):
        log.write(json.dumps(rec) + ("\n" if newline else "")); log.flush()
    if behaviour == "hang":
        write({"event": "step", "epoch": 1, "step": 1, "total_steps": 100, "loss": 1.0})
        time.sleep(60)
    for step in (5, 10, 15, 20):
        write({"event": "step", "epoch": step // 10 + 1, "step": step, "total_steps": 20, "loss": 1.0 / step,
               "eta_s": 20 - step, "total_epochs": 2})
        time.sleep(0.05)
    if behaviour == "crash":
        write({"event": "error", "message": "CUDA out of memory", "kind": "oom"})
        sys.exit(3)
    log.write('{"event": "epoch", "epoch": 2, "st')  # a line cut mid-write, completed below
    log.flush(); time.sleep(0.1)
    log.write('ep": 20, "val": {"mean_dice_fg": 0.75}}\n'); log.flush()
    write({"event": "done", "epoch": 2, "step": 20, "best_metric": 0.75, "package": args[args.index("--pkg") + 1]},
          newline=False)
''')


@pytest.fixture
def dataset(tmp_path):
    from LumbarSegmentLib.dataset.cases import write_case

    vol = small_volume()
    lab = np.zeros(vol.shape, np.uint8)
    lab[2:4, 10:20, 10:20] = 1
    folder = tmp_path / "dataset"
    write_case(folder, "c1", vol, vol.with_array(lab), labels={1: "vertebral_body"},
               annotated_structures=["vertebral_body"])
    return folder


def trainer_command(script, behaviour, package="none"):
    def command(python, request):
        return [sys.executable, str(script), "--data", str(request.dataset), "--out", str(request.output),
                "--pkg", str(package), behaviour]
    return command


@pytest.fixture
def fake_trainer(tmp_path):
    p = tmp_path / "fake_trainer.py"
    p.write_text(FAKE_TRAINER)
    return p


def test_retrain_follows_the_progress_log_and_publishes(fake_trainer, dataset, tiny_package, tmp_path, monkeypatch):
    monkeypatch.setenv("LUMBARSEG_HOME", str(tmp_path / "home"))
    out = tmp_path / "run"
    out.mkdir()
    (out / "progress.jsonl").write_text('{"event": "done", "package": "from an older run"}\n')
    ctl = sl.RetrainController(command=trainer_command(fake_trainer, "ok", tiny_package.path))
    core = sl.ModuleLogic(None, None, trainer=ctl, registries=None)
    core.start_retrain(dataset, out)
    fractions = []
    assert wait_for(lambda: fractions.append(core.poll_retrain().fraction) or ctl.status.finished, timeout=60)
    assert ctl.status.state == sl.DONE, ctl.status.message
    assert [r["event"] for r in ctl.records] == ["step"] * 4 + ["epoch", "done", "publish"]  # old line skipped
    assert ctl.latest["val"] == {"mean_dice_fg": 0.75} and ctl.latest["best_metric"] == 0.75
    assert ctl.package_path == tiny_package.path
    # the real `lumbarseg-train publish` ran as the second phase, into the user's registry
    assert ctl.published and ctl.published.startswith("published uvd-tiny@1"), ctl.status.message
    assert ctl.publish_event["ref"] == "uvd-tiny@1"
    assert "epoch 2" in ctl.status.message and ctl.published in ctl.status.message
    from LumbarSegmentLib.registry.registry import Registry, user_registry_root

    assert [p.ref for p in Registry(user_registry_root()).packages()] == ["uvd-tiny@1"]
    assert "uvd-tiny@1" in [ref for _, ref in core.model_choices()]
    assert max(f for f in fractions if f is not None) == 1.0


def test_retrain_publishing_failure_keeps_the_run_done(fake_trainer, dataset, tmp_path):
    ctl = sl.RetrainController(command=trainer_command(fake_trainer, "ok", tmp_path / "no-such-package"),
                               publish=lambda python, pkg, *data: [sys.executable, "-c",
                                                            "import sys; sys.exit('lumbarseg-train: error: no package')"])
    ctl.start(dataset, tmp_path / "run")
    assert wait_for(lambda: ctl.poll().finished, timeout=60)
    assert ctl.status.state == sl.DONE and "publishing failed (no package)" in ctl.status.message
    assert ctl.published is None


def test_retrain_failure_reports_the_trainers_error(fake_trainer, dataset, tmp_path):
    ctl = sl.RetrainController(command=trainer_command(fake_trainer, "crash"))
    ctl.start(dataset, tmp_path / "run")
    assert wait_for(lambda: ctl.poll().finished, timeout=60)
    assert ctl.status.state == sl.FAILED and ctl.status.message == "CUDA out of memory"
    assert ctl.status.fraction == 1.0 and ctl.package_path is None


def test_retrain_stop_kills_the_trainer(fake_trainer, dataset, tmp_path):
    ctl = sl.RetrainController(command=trainer_command(fake_trainer, "hang"))
    ctl.start(dataset, tmp_path / "run")
    assert wait_for(lambda: ctl.poll().fraction == 0.01, timeout=30)
    pid = ctl._process.proc.pid
    ctl.stop(grace=1.0)
    assert ctl.status.state == sl.CANCELLED and "--resume" in ctl.status.message
    assert wait_for(lambda: not sl.alive(pid), timeout=5)


def test_a_new_panel_reattaches_to_a_running_training_and_can_resume_it(fake_trainer, dataset, tmp_path):
    """A module reload loses the controller, not the run: the run folder says what is going on."""
    first = sl.RetrainController(command=trainer_command(fake_trainer, "hang"))
    first.start(dataset, tmp_path / "run")
    assert wait_for(lambda: first.poll().fraction == 0.01, timeout=30)
    pid = first._process.proc.pid
    del first  # the panel is gone; the child runs on in its own session
    panel = sl.ModuleLogic(None, None, trainer=sl.RetrainController(command=trainer_command(fake_trainer, "hang")))
    st = panel.reattach_retrain(tmp_path / "run")
    assert st.state == sl.RUNNING and st.fraction == 0.01, st
    panel.stop_retrain()
    assert wait_for(lambda: not sl.alive(pid), timeout=10)
    gone = sl.ModuleLogic(None, None, trainer=sl.RetrainController()).reattach_retrain(tmp_path / "run")
    assert gone.state == sl.CANCELLED and "Resume" in gone.message
    panel.resume_retrain()
    assert panel.trainer.running and panel.trainer._argv[-1] == "--resume"
    panel.stop_retrain(), wait_for(lambda: not panel.trainer.running, timeout=10)


def test_the_held_out_cases_never_reach_training(dataset, tmp_path):
    from LumbarSegmentLib.dataset.cases import write_case

    vol = small_volume()
    lab = np.zeros(vol.shape, np.uint8)
    lab[1:3, 5:9, 5:9] = 1
    for i in range(2, 9):
        write_case(dataset, f"c{i}", vol, vol.with_array(lab), labels={1: "vertebral_body"},
                   annotated_structures=["vertebral_body"])
    seen = []
    ctl = sl.RetrainController(runner=lambda argv, env, out: seen.append(argv) or sl.popen_runner(["true"], env, out))
    ctl.start(dataset, tmp_path / "run", base_model="uvd-starter@1", epochs=2)
    assert ctl.holdout == ["c4", "c8"]  # every 4th patient (sorted: c1 c2 c3 c4 c5 c6 c7 c8)
    from LumbarSegmentLib.training.cli import build_parser

    a = build_parser().parse_args(seen[0][3:])
    assert a.exclude == "c4,c8" and a.epochs == 2 and a.source == "uvd-starter@1"
    assert sl.publish_command("py", Path("p"), dataset, ctl.holdout)[-2:] == ["--cases", "c4,c8"]


def test_retrain_refuses_a_folder_without_cases(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaseError, match="no case files"):
        sl.RetrainController(command=lambda *a: ["true"]).start(tmp_path / "empty", tmp_path / "run")


def test_train_and_publish_commands_parse_with_the_training_cli():
    from LumbarSegmentLib.slicer.retrain_job import TrainRequest
    from LumbarSegmentLib.training.cli import build_parser

    parser = build_parser()
    argv = sl.train_command("py", TrainRequest(Path("d"), Path("o"), ("--threads", "1"), "uvd-starter@1", epochs=3,
                                               max_minutes=7.5, exclude=("c03", "c07"), resume=True))
    assert argv[:3] == ["py", "-m", "LumbarSegmentLib.training.cli"]
    a = parser.parse_args(argv[3:])
    assert (a.command, a.source, a.data, a.out, a.epochs, a.max_minutes, a.exclude, a.resume, a.threads) == \
        ("finetune", "uvd-starter@1", "d", "o", 3, 7.5, "c03,c07", True, 1)
    a = parser.parse_args(sl.train_command("py", TrainRequest(Path("d"), Path("o")))[3:])
    assert a.command == "train" and a.epochs == 40 and a.exclude is None
    a = parser.parse_args(sl.publish_command("py", Path("pkg"), Path("d"), ["c03"])[3:])
    assert (a.command, a.package, a.data, a.cases) == ("publish", "pkg", "d", "c03")
    assert parser.parse_args(sl.publish_command("py", Path("pkg"))[3:]).data is None
    # the browser's --models REGISTRY: publishing goes there, named by the command, not patched in
    a = parser.parse_args(sl.publish_command("py", Path("pkg"), registry=Path("reg"))[3:])
    assert a.registry == "reg"
    ctl = sl.RetrainController(publish_registry=Path("reg"))
    assert ctl.publish_registry == Path("reg")


# ------------------------------------------------------------------------------------------------ dependencies
class FakePyTorchUtils:
    def __init__(self):
        self.calls = []

    def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None):
        self.calls.append((askConfirmation, torchVersionRequirement))
        return object()


def make_installer(missing, *, extension=True, importable=True, confirm=True, pip_fails=False, imported=()):
    log = {"pip": [], "asked": [], "constraints": []}
    ext = FakePyTorchUtils() if extension else None

    def pip_install(reqs, constraints):
        log["constraints"].append(Path(constraints).read_text())
        if pip_fails:
            raise RuntimeError("network unreachable")
        log["pip"].append(list(reqs))

    def ask(message):
        log["asked"].append(message)
        return confirm

    def import_module(name):
        if not importable:
            raise ImportError(name)

    inst = DependencyInstaller(pip_install=pip_install, confirm=ask, pytorch_utils=lambda: ext,
                               find_spec=lambda name: None if name in missing else object(),
                               import_module=import_module, imported=set(imported))
    return inst, log, ext


def test_nothing_to_install_asks_nothing():
    inst, log, ext = make_installer(missing=[])
    result = inst.ensure()
    assert result.installed == [] and not result.restart_required and log == {"pip": [], "asked": [],
                                                                              "constraints": []}


def test_torch_through_the_pytorch_extension_after_asking():
    inst, log, ext = make_installer(missing=["torch", "tqdm"])
    result = inst.ensure()
    assert len(log["asked"]) == 1 and "PyTorch extension" in log["asked"][0] and "tqdm>=4.60" in log["asked"][0]
    assert ext.calls == [(False, ">=2.1,<3")]
    assert log["pip"] == [["tqdm>=4.60"]], "torch must not go through pip when the extension is there"
    assert result.installed == ["torch", "tqdm"] and not result.restart_required


def test_pip_fallback_pins_slicers_own_packages():
    inst, log, _ = make_installer(missing=["torch"], extension=False)
    inst.ensure()
    assert log["pip"] == [["torch>=2.1,<3"]]
    pins = log["constraints"][0]
    for dist in ("numpy", "SimpleITK"):
        assert f"{dist}=={installed_version(dist)}" in pins
    assert "with pip" in inst.plan().describe() and "stay exactly as they are" in inst.plan().describe()


def test_declined_installs_nothing():
    inst, log, ext = make_installer(missing=["torch"], confirm=False)
    with pytest.raises(DependencyError, match="declined"):
        inst.ensure()
    assert log["pip"] == [] and ext.calls == []


def test_restart_needed_when_still_not_importable_or_already_imported():
    inst, _, _ = make_installer(missing=["safetensors"], importable=False)
    result = inst.ensure()
    assert result.restart_required and "Restart Slicer" in result.message and "safetensors" in result.message
    inst, _, _ = make_installer(missing=["torch"], imported=["torch"])  # a broken torch was loaded before
    assert inst.ensure().restart_required


def test_pip_failure_is_a_clear_error():
    inst, _, _ = make_installer(missing=["tqdm"], pip_fails=True)
    with pytest.raises(DependencyError, match="network unreachable"):
        inst.ensure()


def test_no_way_to_ask_is_refused():
    inst, log, _ = make_installer(missing=["tqdm"])
    inst.confirm = None
    with pytest.raises(DependencyError, match="no way to ask"):
        inst.ensure()
    assert log["pip"] == []
