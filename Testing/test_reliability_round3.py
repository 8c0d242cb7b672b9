"""Reliability catalogue, round 3: the command-line, dataset, registry and format defects of a third
attack (docs/reliability.md, "Round 3"). The browser server's cases live in their own tests.

Same promises as Testing/test_reliability.py: a refusal is one line naming the problem and what to do,
the command exits non-zero, nothing is half-written, and no input is ever touched. Synthetic data and
tiny random models only (nothing here needs the shared data).
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest

from LumbarSegmentLib.cli.main import main
from LumbarSegmentLib.formats.io import read_volume, write_volume
from LumbarSegmentLib.registry.package import PackageError, read_package
from LumbarSegmentLib.registry.registry import Registry
from LumbarSegmentLib.registry.catalog import Catalog
from LumbarSegmentLib.core.volume import Volume
from conftest import make_package
from test_reliability import everything_in, sagittal
from test_reliability_round2 import snapshot

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
    return make_package(tmp_path_factory.mktemp("rel3-pkg") / "uvd-rel3", init_filters=2, name="uvd-rel3")


def segment(*args: str, pkg=None) -> int:
    extra = ["--model", str(pkg.path)] if pkg is not None else []
    return main(["segment", *args, *extra, "--device", "cpu", "--no-progress"])


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if "error" in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def tree(folder: Path) -> dict:
    """Every file under ``folder`` (hidden ones too) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def no_inference(monkeypatch):
    """Make any inference fail loudly: a refusal must come before it."""
    import LumbarSegmentLib.inference.engine as engine

    def boom(*a, **k):
        raise AssertionError("inference ran although the run should have been refused first")

    monkeypatch.setattr(engine, "segment_volume", boom)


# ============================================================================ 1. cohort outputs vs inputs
@pytest.mark.parametrize("flag, value", [("--report", "b.mha"), ("--report", "a.mha"), ("--report", "new.mha")])
def test_a_cohort_report_never_overwrites_an_input(flag, value, pkg, tmp_path, capsys, monkeypatch):
    no_inference(monkeypatch)
    a = write_volume(sagittal(seed=1), tmp_path / "a.mha")
    b = write_volume(sagittal(seed=2), tmp_path / "b.mha")
    before = tree(tmp_path)
    rc = segment(str(a), str(b), "-o", str(tmp_path / "out"), flag, str(tmp_path / value), pkg=pkg)
    line = one_error_line(capsys.readouterr().err)
    assert rc == 1 and "--report" in line and (".json" in line or "input" in line), line
    assert tree(tmp_path) == before and not (tmp_path / "out").exists()


def test_a_cohort_summary_named_like_an_input_json_is_refused(pkg, tmp_path, capsys, monkeypatch):
    """The summary must not be the same file as a per-case report either (two outputs, one file)."""
    no_inference(monkeypatch)
    a = write_volume(sagittal(seed=1), tmp_path / "a.mha")
    b = write_volume(sagittal(seed=2), tmp_path / "b.mha")
    out = tmp_path / "out"
    rc = segment(str(a), str(b), "-o", str(out), "--report", str(out / "a_report.json"), pkg=pkg)
    line = one_error_line(capsys.readouterr().err)
    assert rc == 1 and "both name" in line
    assert [n for n in everything_in(out) if n.endswith(".json")] == []


@pytest.mark.parametrize("name, problem", [("seg.nii.gz", "DICOM SEG"), ("seg.json", "DICOM SEG"),
                                           ("seg", "DICOM SEG")])
def test_dicom_seg_output_type_is_checked_like_the_others(name, problem, pkg, tmp_path, capsys, monkeypatch):
    from LumbarSegmentLib.formats.dicom_write import write_dicom_series

    no_inference(monkeypatch)
    d = tmp_path / "series"
    write_dicom_series(sagittal(), d)
    out = tmp_path / "out"
    out.mkdir()
    rc = segment(str(d), "-o", str(out / "s.nii.gz"), "--dicom-seg", str(out / name), pkg=pkg)
    line = one_error_line(capsys.readouterr().err)
    assert rc == 1 and problem in line and ".dcm" in line, line
    assert everything_in(out) == []


@pytest.mark.parametrize("flag", ["--dicom-seg", "--preview", "--seg-nrrd", "--confidence", "-o"])
def test_cohort_output_folders_are_never_made_inside_an_input_dicom_folder(flag, pkg, tmp_path, capsys,
                                                                              monkeypatch):
    from LumbarSegmentLib.formats.dicom_write import write_dicom_series

    no_inference(monkeypatch)
    cohort = tmp_path / "dcm"
    write_dicom_series(sagittal(seed=1), cohort / "s1")
    write_dicom_series(sagittal(seed=2), cohort / "s2", series_number=2)
    before = tree(cohort)
    out = tmp_path / "out"
    inside = str(cohort / "s2" / "segs")
    args = ["-o", inside] if flag == "-o" else ["-o", str(out), flag, inside]
    rc = segment(str(cohort), *args, pkg=pkg)
    line = one_error_line(capsys.readouterr().err)
    assert rc == 1 and "inside the input folder" in line, line
    assert tree(cohort) == before and not (cohort / "s2" / "segs").exists()


def test_an_empty_output_name_is_refused(pkg, tmp_path, capsys, monkeypatch):
    no_inference(monkeypatch)
    src = write_volume(sagittal(), tmp_path / "a.mha")
    monkeypatch.chdir(tmp_path)
    before = tree(tmp_path)
    rc = segment(str(src), "-o", "", pkg=pkg)
    line = one_error_line(capsys.readouterr().err)
    assert rc == 1 and "-o/--output is empty" in line
    assert tree(tmp_path) == before


def test_series_on_a_volume_file_is_refused_not_ignored(pkg, tmp_path, capsys, monkeypatch):
    no_inference(monkeypatch)
    src = write_volume(sagittal(), tmp_path / "a.mha")
    rc = segment(str(src), "-o", str(tmp_path / "s.nii.gz"), "--series", "1.2.3", pkg=pkg)
    line = one_error_line(capsys.readouterr().err)
    assert rc == 1 and "--series" in line and "volume file" in line
    assert not (tmp_path / "s.nii.gz").exists()


def test_an_output_name_too_long_for_its_temporary_is_refused_before_inference(pkg, tmp_path, capsys,
                                                                                 monkeypatch):
    no_inference(monkeypatch)
    src = write_volume(sagittal(), tmp_path / "a.mha")
    name = "x" * 240 + ".nii.gz"  # 247 characters: legal, but its hidden temporary name is not
    rc = segment(str(src), "-o", str(tmp_path / name), pkg=pkg)
    line = one_error_line(capsys.readouterr().err)
    assert rc == 1 and "characters long" in line and "shorter name" in line and "a.mha" not in line, line
    assert everything_in(tmp_path) == ["a.mha"]


def test_replacing_an_existing_cohort_output_is_said(pkg, tmp_path, capsys):
    e2 = tmp_path / "e2"
    e2.mkdir()
    src = write_volume(sagittal(), e2 / "a.mha")
    (e2 / "a_seg.nii.gz").write_bytes(b"an earlier result")
    rc = segment(str(src), "-o", str(e2), pkg=pkg)
    err = capsys.readouterr().err
    assert rc == 0 and "will be replaced" in err and "a_seg.nii.gz" in err, err
    assert read_volume(e2 / "a_seg.nii.gz").array.dtype == np.uint8


@pytest.mark.parametrize("value", ["1025", "0", "-2", "nan"])
def test_thread_counts_state_their_limit(value, pkg, tmp_path, capsys):
    src = write_volume(sagittal(), tmp_path / "a.mha")
    with pytest.raises(SystemExit) as e:
        segment(str(src), "-o", str(tmp_path / "s.nii.gz"), "--threads", value, pkg=pkg)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "1-1024" in err and "Traceback" not in err, err


# ============================================================================ 2. datasets are input
def _dataset(folder: Path, n=2, patients=None) -> Path:
    from LumbarSegmentLib.dataset.cases import write_case

    for c in range(n):
        img = sagittal((4, 16, 12), seed=c)
        lab = np.zeros(img.shape, np.uint8)
        lab[1:3, 4:8, 3:7] = 1
        write_case(folder, f"c{c}", img, img.with_array(lab), labels={1: "vertebral_body"},
                   annotated_structures=["vertebral_body"], patient=(patients or {}).get(c))
    return folder


def train_cli(*args: str) -> int:
    from LumbarSegmentLib.training.cli import main as train_main

    return train_main([*args])


@pytest.mark.parametrize("command", ["evaluate", "finetune", "train", "cv"])
@pytest.mark.parametrize("where", ["data", "inside"])
def test_no_training_command_writes_its_results_into_the_dataset(command, where, pkg, tmp_path, capsys):
    data = _dataset(tmp_path / "data")
    before = tree(data)
    out = data if where == "data" else data / "results"
    extra = {"evaluate": ["--model", str(pkg.path)], "finetune": ["--from", str(pkg.path)],
             "train": ["--variant", "UD"], "cv": ["--variant", "UD"]}[command]
    rc = train_cli(command, "--data", str(data), *extra, "--out", str(out))
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and "dataset folder" in line and "--out" in line, line
    assert tree(data) == before and everything_in(data) == sorted(before)


def test_publish_never_writes_the_holdout_file_into_the_dataset(pkg, tmp_path, capsys):
    data = _dataset(tmp_path / "data", n=3)
    before = tree(data)
    reg = tmp_path / "reg"
    rc = train_cli("publish", str(pkg.path), "--registry", str(reg), "--data", str(data), "--device", "cpu")
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and "lumbarseg-train holdout --data" in line and "--assign" in line, line
    assert tree(data) == before and not (reg / "index.json").exists()
    # the explicit command writes the split; publish then only reads it
    assert train_cli("holdout", "--data", str(data), "--assign") == 0
    frozen = (data / ".holdout.json").read_bytes()
    assert train_cli("publish", str(pkg.path), "--registry", str(reg), "--data", str(data), "--device", "cpu") == 0
    assert (data / ".holdout.json").read_bytes() == frozen and Registry(reg).default_ref() == "uvd-rel3@1"


@pytest.mark.parametrize("content, problem", [
    ([1, 2], "not a case"),
    ({"case": "c9", "image": "a.mha", "label": "b.mha", "labels": {}, "annotated_structures": [], "version": None},
     '"version" must be a whole number'),
    ({"case": "c9", "image": "a.mha", "label": "b.mha", "labels": {}, "annotated_structures": [],
      "format_version": None}, '"format_version" must be a whole number'),
    ({"case": "c9", "image": "a.mha", "label": "b.mha", "labels": {}, "annotated_structures": [], "version": "2"},
     '"version" must be a whole number'),
    ({"case": "c9", "image": None, "label": "b.mha", "labels": {}, "annotated_structures": []},
     '"image" must be a file name (got None)'),
    ({"case": "c9", "image": "a.mha", "label": "b.mha", "labels": {}, "annotated_structures": "vertebral_body"},
     '"annotated_structures" must be a list'),
    ({"case": "c9", "image": "a.mha", "label": "b.mha", "labels": {"1": None}, "annotated_structures": []},
     "must be text"),
])
def test_a_malformed_case_file_is_one_line(content, problem, tmp_path, capsys):
    data = _dataset(tmp_path / "data")
    (data / "junk.json").write_text(json.dumps(content))
    before = tree(data)
    rc = train_cli("holdout", "--data", str(data))
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and "junk.json" in line and problem in line, line
    assert tree(data) == before


def test_two_case_files_with_one_id_and_version_are_not_silently_dropped(tmp_path, capsys):
    from LumbarSegmentLib.dataset.cases import CaseError, list_cases

    data = _dataset(tmp_path / "data")
    copy = json.loads((data / "c1__v1.json").read_text())
    copy["image"], copy["label"] = "c0_image.mha", "c0_label.mha"
    (data / "c1-copy.json").write_text(json.dumps(copy))
    with pytest.raises(CaseError, match=r"both hold case c1 version 1"):
        list_cases(data)


@pytest.mark.parametrize("edit, problem", [
    ({"every": None}, '"every" must be a whole number >= 2'),
    ({"every": "4"}, '"every" must be a whole number >= 2'),
    ({"format_version": 99}, "newer than this LumbarSegment supports"),
    ({"format_version": None}, '"format_version" must be a whole number'),
    ({"patients": {"p0": "maybe"}}, 'must be "train" or "holdout"'),
])
def test_a_malformed_holdout_file_is_one_line(edit, problem, tmp_path, capsys):
    data = _dataset(tmp_path / "data")
    doc = {"format": "lumbarsegment.holdout", "format_version": 1, "every": 4, "patients": {"c0": "train"}, **edit}
    (data / ".holdout.json").write_text(json.dumps(doc))
    before = tree(data)
    rc = train_cli("holdout", "--data", str(data), "--assign")
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and ".holdout.json" in line and problem in line, line
    assert tree(data) == before


# ============================================================================ 3. registry writes validated first
def _published(tmp_path, pkg) -> Registry:
    reg = Registry(tmp_path / "reg")
    reg.publish(pkg, make_default=True, catalog=Catalog.around(reg))
    return reg


@pytest.mark.parametrize("ensemble, problem", [("uvd-rel3@1,bad ref", "model ref like"),
                                               ("uvd-rel3@x", "model ref like"),
                                               ("@new,ghost@9", "ghost@9, which no registry holds")])
def test_publish_with_a_bad_ensemble_writes_nothing(ensemble, problem, pkg, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LUMBARSEG_HOME", str(tmp_path / "home"))
    reg = _published(tmp_path, pkg)
    before = tree(reg.root)
    rc = train_cli("publish", str(pkg.path), "--registry", str(reg.root), "--ensemble", ensemble, "--no-default")
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and problem in line and "nothing was published" in line, line
    assert tree(reg.root) == before
    assert reg.index()["ensemble"] == [] and reg.default_ref() == "uvd-rel3@1"


def test_a_bad_ensemble_is_refused_before_the_candidate_is_graded(pkg, tmp_path, monkeypatch):
    from LumbarSegmentLib.dataset.cases import list_cases
    from LumbarSegmentLib.registry.manifest import ManifestError
    from LumbarSegmentLib.training import evaluate, publish

    reg = _published(tmp_path, pkg)
    graded = []
    monkeypatch.setattr(evaluate, "evaluate_packages", lambda *a, **k: graded.append(a) or {})
    cases = list_cases(_dataset(tmp_path / "data", n=3))
    with pytest.raises(ManifestError, match="ghost@9"):
        publish.publish_if_better(pkg, reg, cases=cases, ensemble=["@new", "ghost@9"], registries=[reg])
    assert graded == [] and reg.index()["ensemble"] == []


def test_models_says_when_the_default_names_a_missing_model(pkg, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LUMBARSEG_HOME", str(tmp_path / "home"))
    user = Registry(tmp_path / "home" / "models")
    user.publish(pkg, make_default=True, catalog=Catalog.around(user))
    idx = json.loads(user.index_path.read_text())
    idx["default"] = "ghost@1"
    user.index_path.write_text(json.dumps(idx))
    capsys.readouterr()
    rc = main(["models"])
    err = capsys.readouterr().err
    assert rc == 1 and "ghost@1" in err and "Traceback" not in err, err


@pytest.mark.parametrize("errno_name", ["EROFS", "ENOSPC"])
def test_publish_into_an_unwritable_registry_is_a_sentence(errno_name, pkg, tmp_path, capsys, monkeypatch):
    import errno
    import shutil

    reg = _published(tmp_path, pkg)
    before = tree(reg.root)

    def failing_copy(*a, **k):
        raise OSError(getattr(errno, errno_name), os.strerror(getattr(errno, errno_name)), str(reg.root))

    monkeypatch.setattr(shutil, "copy2", failing_copy)
    rc = train_cli("publish", str(pkg.path), "--registry", str(reg.root), "--no-default")
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and "could not publish into the registry" in line and "[Errno" not in line, line
    assert ("--registry" in line) and ("index is unchanged" in line)
    assert tree(reg.root) == before


def test_ctrl_c_during_publish_does_not_suggest_resume(pkg, tmp_path, capsys, monkeypatch):
    from LumbarSegmentLib.training import publish

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(publish, "publish_if_better", interrupted)
    rc = train_cli("publish", str(pkg.path), "--registry", str(tmp_path / "reg"))
    err = capsys.readouterr().err
    assert rc == 130 and "--resume" not in err and "run the same command again" in err, err


# ============================================================================ 4. provenance is sealed
def _with_provenance(tmp_path, name="prov") -> "object":
    import torch

    from LumbarSegmentLib.models import build_model
    from LumbarSegmentLib.registry.package import write_package
    from LumbarSegmentLib.core.schema import load_schema

    torch.manual_seed(0)
    model = build_model("UVD", num_classes=3, init_filters=2)
    return write_package(tmp_path / name, model, name=name, schema=load_schema("starter"),
                         training={"train_cases": ["c0", "c1"], "val_cases": ["c2"],
                                   "data_manifest": [{"case": "c0", "patient": "p0"}]})


@pytest.mark.parametrize("field", ["train_cases", "data_manifest", "val_cases"])
def test_removing_the_training_provenance_breaks_the_seal(field, tmp_path):
    p = _with_provenance(tmp_path)
    p.verify()
    m = json.loads((p.path / "manifest.json").read_text())
    del m["training"][field]
    (p.path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PackageError, match="record of its training cases"):
        read_package(p.path).verify()


def test_a_package_without_sealed_provenance_is_not_graded_as_clean(pkg, tmp_path, monkeypatch):
    from LumbarSegmentLib.registry.manifest import LEGACY_SCHEME, seal
    from LumbarSegmentLib.training import evaluate, publish

    reg = _published(tmp_path, pkg)
    cand = _with_provenance(tmp_path, "cand")
    m = json.loads((cand.path / "manifest.json").read_text())
    del m["training"]["train_cases"], m["training"]["data_manifest"]
    (cand.path / "manifest.json").write_text(json.dumps(seal(m, LEGACY_SCHEME)))  # a v1 seal does not cover it
    graded = []
    monkeypatch.setattr(evaluate, "evaluate_packages", lambda *a, **k: graded.append(a) or {})
    cases = _dataset(tmp_path / "data", n=3)
    from LumbarSegmentLib.dataset.cases import list_cases

    res = publish.publish_if_better(read_package(cand.path), reg, cases=list_cases(cases), registries=[reg])
    assert not res["default"] and "not graded" in res["reason"] and "trained on" in res["reason"], res["reason"]
    assert graded == [] and reg.default_ref() == "uvd-rel3@1"


# ============================================================================ 5. formats
@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("slope, inter", [(2.0, 0.0), (1.0, -100.0), (0.5, 7.0)])
def test_a_scaled_nifti_is_read_not_called_truncated(slope, inter, compressed, tmp_path):
    """dcm2niix writes int16 voxels with scl_slope/scl_inter; ITK scales them to float32 on reading."""
    import gzip
    import struct

    vol = sagittal(dtype=np.int16)
    raw = write_volume(vol, tmp_path / "v.nii", compress=False).read_bytes()
    head = bytearray(raw)
    head[112:120] = struct.pack("<2f", slope, inter)
    path = tmp_path / ("v.nii.gz" if compressed else "v2.nii")
    path.write_bytes(gzip.compress(bytes(head)) if compressed else bytes(head))
    back = read_volume(path)
    np.testing.assert_allclose(back.array, vol.array.astype(np.float64) * slope + inter, rtol=1e-6)
    # and a truncated scaled file is still refused
    cut = tmp_path / "cut.nii"
    cut.write_bytes(bytes(head[: len(head) - 100]))
    with pytest.raises(Exception, match="truncated"):
        read_volume(cut)


# ============================================================================ 6. recorded architectures
def _resealed(pkg, tmp_path, edit) -> Path:
    import shutil

    from LumbarSegmentLib.registry.manifest import seal

    dst = tmp_path / "edited"
    shutil.copytree(pkg.path, dst)
    m = json.loads((dst / "manifest.json").read_text())
    edit(m)
    (dst / "manifest.json").write_text(json.dumps(seal(m)))
    return dst


@pytest.mark.parametrize("edit, problem", [
    (lambda m: m["architecture"].update(foo=1), "unknown architecture key(s) ['foo']"),
    (lambda m: m["architecture"].update(init_filters=256), "do not fit the recorded architecture"),
    (lambda m: m["architecture"].update(variant="XYZ"), "cannot be built"),
])
def test_a_resealed_architecture_is_one_line_naming_the_package(edit, problem, pkg, tmp_path, capsys):
    edited = _resealed(pkg, tmp_path, edit)
    src = write_volume(sagittal(), tmp_path / "a.mha")
    rc = main(["segment", str(src), "-o", str(tmp_path / "s.nii.gz"), "--model", str(edited), "--device", "cpu",
               "--no-progress"])
    line = one_error_line(capsys.readouterr().err)
    assert rc == 1 and problem in line and "uvd-rel3@1" in line, line
    assert not (tmp_path / "s.nii.gz").exists()


def test_weights_that_do_not_fit_are_found_before_the_network_is_built(pkg, tmp_path, monkeypatch):
    """A huge init_filters would build a GB-sized network; the shape check on the meta device refuses it first."""
    import torch

    import LumbarSegmentLib.models.checked as arch

    edited = _resealed(pkg, tmp_path, lambda m: m["architecture"].update(init_filters=256))
    devices = []
    real = arch._build
    monkeypatch.setattr(arch, "_build", lambda args, where: devices.append(torch.empty(0).device.type) or real(
        args, where))
    with pytest.raises(PackageError, match="do not fit the recorded architecture"):
        read_package(edited).load_model()
    assert devices == ["meta"], "only the shape-only (meta) skeleton may be built"


def test_an_unknown_builder_key_in_a_checkpoint_is_one_line(pkg, tmp_path, capsys):
    import torch

    from LumbarSegmentLib.training.checkpoints import CHECKPOINT_FORMAT
    from LumbarSegmentLib.training.config import TrainConfig

    model = pkg.load_model()
    ck = {"format": CHECKPOINT_FORMAT, "config": TrainConfig(variant="UVD", init_filters=2).to_dict(),
          "builder_args": {**model.builder_args, "foo": 1}, "model": model.state_dict(), "epoch": 0}
    torch.save(ck, tmp_path / "last.pt")
    rc = train_cli("export", str(tmp_path / "last.pt"), "--out", str(tmp_path / "exp"))
    line = one_error_line(capsys.readouterr().err)
    assert rc == 2 and "unknown architecture key(s) ['foo']" in line and "last.pt" in line, line
    assert not (tmp_path / "exp").exists()


# ============================================================================ 7. export claims across namespaces
def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("record", ["{pid} {host}\n",  # an older record: no namespace, so not ours to judge
                                    "{pid} {host} ns999999 boot{boot} 0123abcd\n"])  # another PID namespace
def test_a_claim_from_another_pid_namespace_is_never_taken_over(record, tmp_path):
    """Two containers with one host name: a pid in the other's claim means nothing here, dead or alive."""
    from LumbarSegmentLib.dataset.cases import list_cases, write_case
    from LumbarSegmentLib.core.files import boot_id

    img = sagittal((4, 16, 12))
    lab = img.with_array((img.array > 100).astype(np.uint8))
    data = tmp_path / "data"
    data.mkdir()
    write_volume(img, data / "c1__v1_image.mha")  # the other container's export, still being written
    (data / ".c1__v1.lock").write_text(record.format(pid=_dead_pid(), host=socket.gethostname(), boot=boot_id()))
    theirs = tree(data)
    case = write_case(data, "c1", img, lab, labels={1: "vertebral_body"}, annotated_structures=["vertebral_body"])
    assert case.version == 2
    assert all(tree(data)[name] == theirs[name] for name in theirs), "their files were touched"
    assert [c.version for c in list_cases(data)] == [2]


def test_a_claim_of_a_dead_process_in_this_namespace_is_still_taken_over(tmp_path):
    from LumbarSegmentLib.dataset.cases import write_case
    from LumbarSegmentLib.core.files import boot_id, pid_namespace

    img = sagittal((4, 16, 12))
    lab = img.with_array((img.array > 100).astype(np.uint8))
    data = tmp_path / "data"
    data.mkdir()
    write_volume(img, data / "c1__v1_image.mha")
    (data / ".c1__v1.lock").write_text(f"{_dead_pid()} {socket.gethostname()} ns{pid_namespace() or '-'} "
                                       f"boot{boot_id() or '-'} 0123abcd\n")
    case = write_case(data, "c1", img, lab, labels={1: "vertebral_body"}, annotated_structures=["vertebral_body"])
    assert case.version == 1 and not (data / ".c1__v1.lock").exists()


def test_a_claim_taken_over_is_not_released_by_its_first_owner(tmp_path):
    from LumbarSegmentLib.dataset.cases import _release, claim_record

    lock = tmp_path / ".c1__v1.lock"
    mine = claim_record()
    lock.write_text(claim_record())  # someone else's claim replaced ours
    _release(lock, mine)
    assert lock.exists()
    lock.write_text(mine)
    _release(lock, mine)
    assert not lock.exists()


# ============================================================================ 8. training says what it learns from
def test_training_warns_of_nan_voxels_and_of_an_empty_label(tmp_path, caplog):
    import logging

    from LumbarSegmentLib.dataset.cases import write_case
    from LumbarSegmentLib.training.data import load_case_slices

    img = sagittal((4, 32, 28), dtype=np.float32)
    img.array[0, 0, :5] = np.nan
    img.array[1, 0, 0] = np.inf
    empty = img.with_array(np.zeros(img.shape, np.uint8))
    case = write_case(tmp_path / "d", "e1", img, empty, labels={1: "vertebral_body"},
                      annotated_structures=["vertebral_body"])
    with caplog.at_level(logging.WARNING, logger="lumbarseg.train"):
        load_case_slices(case, "starter")
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "6 NaN/infinite image voxel(s)" in text and "e1" in text
    assert "trains as all background" in text and "vertebral_body" in text


@pytest.mark.parametrize("suffix, origin", [(".mha", (1e308, 0.0, float("inf"))), (".nrrd", (0.0, -5e6, 0.0)),
                                            (".mha", (0.0, 2e6, 0.0)), (".nii.gz", (3e7, 0.0, 0.0))])
def test_an_impossible_header_origin_is_refused_not_segmented(suffix, origin, pkg, tmp_path, capsys, monkeypatch):
    import SimpleITK as sitk

    no_inference(monkeypatch)
    img = sitk.GetImageFromArray(sagittal().array)
    img.SetOrigin(origin)
    img.SetDirection(tuple(np.array([[0.0, 0, 1], [1, 0, 0], [0, -1, 0]]).ravel()))
    src = tmp_path / f"a{suffix}"
    sitk.WriteImage(img, str(src))
    rc = segment(str(src), "-o", str(tmp_path / "s.nii.gz"), pkg=pkg)
    line = one_error_line(capsys.readouterr().err)
    assert rc == 1 and "impossible coordinates" in line and "header is damaged" in line, line
    assert not (tmp_path / "s.nii.gz").exists()


def test_a_mixed_orientation_series_says_what_to_do(tmp_path):
    import pydicom

    from LumbarSegmentLib.formats.dicom import DicomError, read_dicom_series
    from LumbarSegmentLib.formats.dicom_write import write_dicom_series

    files = write_dicom_series(sagittal(), tmp_path / "s")
    ds = pydicom.dcmread(files[2])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.save_as(files[2])
    with pytest.raises(DicomError, match=r"inconsistent orientation.*Move the images of the other orientation out"):
        read_dicom_series(tmp_path / "s")


def test_dicom_seg_prerequisites_are_checked_before_inference(pkg, tmp_path, capsys, monkeypatch):
    import pydicom

    from LumbarSegmentLib.formats.dicom_write import write_dicom_series

    files = write_dicom_series(sagittal(), tmp_path / "s")
    for f in files:
        ds = pydicom.dcmread(f)
        for key in ("FrameOfReferenceUID", "SliceThickness"):
            if key in ds:
                delattr(ds, key)
        ds.save_as(f)
    no_inference(monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    rc = segment(str(tmp_path / "s"), "-o", str(out / "s.nii.gz"), "--dicom-seg", str(out / "s.dcm"), pkg=pkg)
    line = one_error_line(capsys.readouterr().err)
    assert rc == 1 and "FrameOfReferenceUID" in line and "SliceThickness" in line and "AttributeError" not in line
    assert everything_in(out) == []


# ============================================================================ 9. number options state their limits
@pytest.mark.parametrize("command, args, problem", [
    ("evaluate", ["--threads", "-2"], "1-1024 CPU threads"),
    ("evaluate", ["--threads", "0"], "1-1024 CPU threads"),
    ("train", ["--spacing", "0"], "0.1-10 each"),
    ("train", ["--spacing", "0.001"], "0.1-10 each"),
    ("train", ["--spacing", "nan"], "0.1-10 each"),
    ("train", ["--epochs", "0"], "1-100000 epochs"),
    ("train", ["--batch-size", "-1"], "1-1024"),
    ("train", ["--patch", "8"], "32-2048"),
    ("train", ["--lr", "inf"], "learning rate"),
    ("train", ["--init-filters", "1024"], "1-256"),
])
def test_training_number_options_are_checked_up_front(command, args, problem, tmp_path, capsys):
    data = _dataset(tmp_path / "data")
    base = {"evaluate": ["--model", "x"], "train": ["--out", str(tmp_path / "run")], "holdout": []}[command]
    with pytest.raises(SystemExit) as e:
        train_cli(command, "--data", str(data), *base, *args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and problem in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_a_failed_start_does_not_block_the_corrected_command(tmp_path, capsys):
    """A start that failed before any step leaves a progress log with no step: not a run to protect."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "progress.jsonl").write_text('{"event": "error", "message": "bad settings"}\n')
    rc = train_cli("train", "--data", str(tmp_path / "nodata"), "--variant", "UD", "--out", str(run))
    err = capsys.readouterr().err
    assert rc == 2 and "already holds a training run" not in err and "does not exist" in err, err
