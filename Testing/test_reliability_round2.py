"""Reliability catalogue, round 2: the hostile inputs of issue 11 (docs/reliability.md, cases 61 onwards).

Same promises as Testing/test_reliability.py: a refusal names the problem and what to do, the
command line exits non-zero, and nothing is left behind; above all, no input is ever touched.
Synthetic data only, tiny models.
"""
from __future__ import annotations

import gzip
import json
import os
import pickle
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LumbarSegmentLib.cli.main import main
from LumbarSegmentLib.formats.io import read_volume, write_volume
from LumbarSegmentLib.core.files import sha256_file
from LumbarSegmentLib.registry.package import PackageError, read_package
from LumbarSegmentLib.registry.registry import Registry
from LumbarSegmentLib.registry.catalog import Catalog
from LumbarSegmentLib.core.volume import Volume, VolumeError, VolumeReadError
from conftest import make_package
from test_reliability import SAGITTAL, everything_in, run_py, sagittal

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
    return make_package(tmp_path_factory.mktemp("rel2-pkg") / "uvd-rel2", init_filters=2, name="uvd-rel2")


def segment(*args: str, pkg=None) -> int:
    extra = ["--model", str(pkg.path)] if pkg is not None else []
    return main(["segment", *args, *extra, "--device", "cpu", "--no-progress"])


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}


# ============================================================================ 1. outputs never overwrite inputs
@pytest.mark.parametrize("which", ["-o", "--report", "--preview", "--seg-nrrd", "--confidence", "hardlink"])
def test_an_output_that_is_an_input_is_refused_before_any_work(which, pkg, tmp_path, capsys):
    src = write_volume(sagittal(), tmp_path / "x.mha")
    before = src.read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    args = [str(src), "-o", str(out / "seg.nii.gz")]
    if which == "-o":
        args = [str(src), "-o", str(src)]
    elif which == "hardlink":
        os.link(src, out / "seg.mha")
        args = [str(src), "-o", str(out / "seg.mha")]
    else:
        args += [which, str(src)]
    rc = segment(*args, pkg=pkg)
    err = capsys.readouterr().err
    assert rc == 1 and "lumbarseg: error:" in err and "Traceback" not in err
    assert ("must never overwrite an input" in err) or ("name ending in" in err), err
    assert src.read_bytes() == before
    assert [n for n in everything_in(tmp_path) + everything_in(out) if ".partial" in n] == []


def test_an_output_named_twice_is_refused(pkg, tmp_path, capsys):
    src = write_volume(sagittal(), tmp_path / "x.nrrd")
    out = tmp_path / "out"
    out.mkdir()
    rc = segment(str(src), "-o", str(out / "a.nii.gz"), "--confidence", str(out / "." / "a.nii.gz"), pkg=pkg)
    err = capsys.readouterr().err
    assert rc == 1 and "both name" in err and "its own file" in err
    assert everything_in(out) == []


def test_an_output_inside_the_input_dicom_folder_is_refused(pkg, tmp_path, capsys):
    from LumbarSegmentLib.formats.dicom_write import write_dicom_series

    d = tmp_path / "series"
    write_dicom_series(sagittal(), d)
    before = snapshot(d)
    rc = segment(str(d), "-o", str(d / "seg.nii.gz"), pkg=pkg)
    assert rc == 1 and "inside the input folder" in capsys.readouterr().err
    assert snapshot(d) == before


# ============================================================================ 2. a damaged default is an error
@pytest.mark.parametrize("damage", ["truncated-manifest", "deleted-version-folder"])
def test_a_damaged_user_default_model_is_an_error_not_a_fallback(damage, pkg, tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    monkeypatch.setenv("LUMBARSEG_HOME", str(home))
    user = Registry(home / "models")
    published = user.publish(pkg, make_default=True, catalog=Catalog.around(user))
    if damage == "truncated-manifest":
        m = published.path / "manifest.json"
        m.write_text(m.read_text()[:50])
    else:
        shutil.rmtree(published.path)
    src = write_volume(sagittal(), tmp_path / "in.nrrd")
    out = tmp_path / "out"
    out.mkdir()
    rc = segment(str(src), "-o", str(out / "s.nii.gz"))
    err = capsys.readouterr().err
    assert rc == 1 and "uvd-rel2" in err, err
    assert everything_in(out) == []


# ============================================================================ 3. DICOM slices without geometry
def _dicom_with(tmp_path: Path, edit) -> Path:
    import pydicom

    from LumbarSegmentLib.formats.dicom_write import write_dicom_series

    d = tmp_path / "series"
    files = write_dicom_series(sagittal((12, 48, 40)), d)
    ds = pydicom.dcmread(files[5])
    edit(ds, files[5])
    return d


@pytest.mark.parametrize("tag", ["PixelSpacing", "ImagePositionPatient"])
def test_a_dicom_slice_without_geometry_is_not_silently_dropped(tag, tmp_path):
    def drop(ds, path):
        delattr(ds, tag)
        ds.save_as(path)

    d = _dicom_with(tmp_path, drop)
    with pytest.raises(VolumeReadError, match=r"1 of its 12 images lack.*IM0006.dcm.*re-export the complete series"):
        read_volume(d)


@pytest.mark.parametrize("value,problem", [("abc", "'abc' is not a number"), ("1e308", "too large to store")])
def test_a_bad_rescale_slope_names_the_file(value, problem, tmp_path):
    def slope(ds, path):
        ds.RescaleSlope = "9.999"
        ds.save_as(path)
        path.write_bytes(path.read_bytes().replace(b"9.999 ", value.encode().ljust(6)))

    d = _dicom_with(tmp_path, slope)
    with pytest.raises(VolumeReadError) as info:
        read_volume(d)
    assert problem in str(info.value) and "IM0006.dcm" in str(info.value)


# ============================================================================ 4./5. cohorts and folders
def test_two_cohort_inputs_with_the_same_name_are_not_silently_merged(pkg, tmp_path, capsys):
    for site in ("siteA", "siteB"):
        (tmp_path / site).mkdir()
        write_volume(sagittal(seed=len(site)), tmp_path / site / "001.mha")
    out = tmp_path / "out"
    rc = segment(str(tmp_path / "siteA" / "001.mha"), str(tmp_path / "siteB" / "001.mha"), "-o", str(out), pkg=pkg)
    err = capsys.readouterr().err
    if rc == 1:  # refused, naming both inputs
        assert "siteA" in err and "siteB" in err and not [n for n in everything_in(out) if "_seg" in n]
    else:  # or both kept under unique names, each report naming its input
        reports = [json.loads(p.read_text()) for p in out.glob("*_report.json")]
        assert sorted(Path(r["input_path"]).parent.name for r in reports) == ["siteA", "siteB"]


def test_a_dicom_folder_holding_a_volume_file_is_refused_as_ambiguous(pkg, tmp_path, capsys):
    from LumbarSegmentLib.formats.dicom_write import write_dicom_series

    d = tmp_path / "series"
    write_dicom_series(sagittal(), d)
    write_volume(sagittal().with_array(np.zeros((6, 48, 40), np.uint8)), d / "seg.nii.gz")
    rc = segment(str(d), "-o", str(tmp_path / "res"), pkg=pkg)
    err = capsys.readouterr().err
    assert rc == 1 and "DICOM files and volume files" in err and "seg.nii.gz" in err
    assert not (tmp_path / "res").exists() or everything_in(tmp_path / "res") == []


def test_output_folder_equal_to_the_input_folder_is_refused(pkg, tmp_path, capsys):
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    write_volume(sagittal(), cohort / "a.nii.gz")
    before = snapshot(cohort)
    rc = segment(str(cohort), "-o", str(cohort), pkg=pkg)
    assert rc == 1 and "is the input folder" in capsys.readouterr().err
    assert snapshot(cohort) == before


def test_label_maps_in_a_cohort_folder_are_skipped_with_a_note(pkg, tmp_path, capsys):
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    write_volume(sagittal(), cohort / "a.nii.gz")
    write_volume(sagittal().with_array(np.zeros((6, 48, 40), np.uint8)), cohort / "a_label.nii.gz")
    (tmp_path / "res").mkdir()
    rc = segment(str(cohort), "-o", str(tmp_path / "res"), pkg=pkg)
    err = capsys.readouterr().err
    assert rc == 0 and "skipped 1 label map(s) (a_label.nii.gz)" in err
    assert not list((tmp_path / "res").glob("a_label*"))


def test_a_label_map_given_as_the_image_is_refused(pkg, tmp_path, capsys):
    lab = np.zeros((6, 48, 40), np.uint8)
    lab[:, 10:20, 10:20], lab[:, 25:30, 10:20] = 1, 2
    src = write_volume(sagittal().with_array(lab), tmp_path / "seg.nii.gz")
    rc = segment(str(src), "-o", str(tmp_path / "out.nii.gz"), pkg=pkg)
    assert rc == 1 and "looks like a label map" in capsys.readouterr().err


# ============================================================================ 6. all-or-nothing commit
def test_an_output_at_an_existing_folder_fails_before_any_output_is_written(pkg, tmp_path, capsys):
    src = write_volume(sagittal(), tmp_path / "in.nrrd")
    out = tmp_path / "out"
    (out / "s.seg.nrrd").mkdir(parents=True)
    rc = segment(str(src), "-o", str(out / "l.nii.gz"), "--report", str(out / "r.json"),
                 "--preview", str(out / "p.png"), "--seg-nrrd", str(out / "s.seg.nrrd"), pkg=pkg)
    assert rc == 1 and "is an existing folder" in capsys.readouterr().err
    assert everything_in(out) == ["s.seg.nrrd"]


def test_a_failed_rename_in_the_commit_restores_every_earlier_file(tmp_path, monkeypatch):
    from LumbarSegmentLib.cli import outputs

    targets = [tmp_path / n for n in ("a.nii.gz", "b.png", "c.json")]
    for t in targets:
        t.write_text("old " + t.name)
    staged = []
    for t in targets:
        tmp = outputs.make_partial(t)
        tmp.write_text("new " + t.name)
        staged.append((tmp, t))
    real = os.replace
    calls = {"n": 0}

    def failing(a, b):
        if Path(b) == targets[2] and ".partial" in Path(a).name:
            calls["n"] += 1
            raise OSError(28, "No space left on device")
        return real(a, b)

    monkeypatch.setattr(outputs.os, "replace", failing)
    with pytest.raises(OSError, match="the disk is full.*earlier files are unchanged"):
        outputs.commit(staged)
    monkeypatch.setattr(outputs.os, "replace", real)
    assert calls["n"] == 1
    assert [t.read_text() for t in targets] == ["old a.nii.gz", "old b.png", "old c.json"]
    assert everything_in(tmp_path) == sorted(t.name for t in targets)


# ============================================================================ 7. headers pointing elsewhere
def _detached(tmp_path: Path, kind: str, data_name: str) -> Path:
    if kind == "mha":
        p = tmp_path / "in" / "x.mha"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("ObjectType = Image\nNDims = 3\nDimSize = 8 8 4\nElementType = MET_UCHAR\n"
                     f"ElementDataFile = {data_name}\n")
    else:
        p = tmp_path / "in" / "x.nhdr"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 8 8 4\nencoding: raw\ndata file: {data_name}\n\n")
    return p


@pytest.mark.parametrize("kind,data_name", [("mha", "/etc/passwd"), ("nhdr", "../../../etc/passwd"),
                                            ("mha", "../secret.raw"), ("nhdr", "/etc/hostname")])
def test_a_header_pointing_outside_its_folder_is_refused(kind, data_name, pkg, tmp_path, capsys):
    (tmp_path / "secret.raw").write_bytes(bytes(256))
    src = _detached(tmp_path, kind, data_name)
    out = tmp_path / "out"
    out.mkdir()
    rc = segment(str(src), "-o", str(out / "s.nii.gz"), "--preview", str(out / "p.png"), pkg=pkg)
    err = capsys.readouterr().err
    assert rc == 1 and "outside its own folder" in err and everything_in(out) == []


def test_a_fifo_as_data_file_or_input_is_refused_without_hanging(tmp_path):
    src = _detached(tmp_path, "mha", "data.raw")
    os.mkfifo(tmp_path / "in" / "data.raw")
    fifo = tmp_path / "in" / "pipe.nrrd"
    os.mkfifo(fifo)
    r = run_py("""
        import sys
        from LumbarSegmentLib.formats.io import read_volume
        for p in sys.argv[1:]:
            try:
                read_volume(p)
            except Exception as e:
                print(type(e).__name__, e)
    """, str(src), str(fifo), timeout=60)
    assert r.stdout.count("not a regular file") == 2, r.stdout + r.stderr


def test_a_detached_header_with_its_data_beside_it_still_reads(tmp_path):
    src = _detached(tmp_path, "nhdr", "x.raw")
    (src.parent / "x.raw").write_bytes(bytes(range(256)))
    assert read_volume(src).shape == (4, 8, 8)


# ============================================================================ 8. wrong types, huge headers
MANIFEST_DAMAGE = [
    ("weights-not-object", lambda m: m.update(weights="x"), "weights must be an object"),
    ("sha256-missing", lambda m: m["weights"].pop("sha256"), "weights.sha256 must be 64"),
    ("sha256-short", lambda m: m["weights"].update(sha256="abc"), "weights.sha256 must be 64"),
    ("version-huge", lambda m: m.update(version=float("inf")), "version must be a whole number"),
    ("format-version-null", lambda m: m.update(format_version=None), "format_version must be a whole number"),
    ("input-list", lambda m: m.update(input=[]), "input must be an object"),
    ("spacing-zero", lambda m: m["input"].update(spacing_mm=[0, 0]), "input.spacing_mm must be a list of 2"),
    ("channels-string", lambda m: m["input"].update(channels="1"), "input.channels must be the number 1"),
    ("name-climbs", lambda m: m.update(name=".."), "model name '..' is not allowed"),
]


@pytest.mark.parametrize("kind,damage,problem", MANIFEST_DAMAGE, ids=[d[0] for d in MANIFEST_DAMAGE])
def test_a_manifest_with_wrong_types_is_a_clear_error(kind, damage, problem, pkg, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(pkg.path, bad)
    m = json.loads((bad / "manifest.json").read_text())
    damage(m)
    (bad / "manifest.json").write_text(json.dumps(m).replace("Infinity", "1e400"))
    src = write_volume(sagittal(), tmp_path / "in.nrrd")
    rc = main(["segment", str(src), "-o", str(tmp_path / "s.nii.gz"), "--model", str(bad), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and problem in err and "Traceback" not in err, err


INDEX_DAMAGE = [
    ("models-entry-list", {"models": {"a": []}}, "must be an object with 'versions'"),
    ("default-number", {"default": 5}, "'default' must be a model ref"),
    ("ensemble-number", {"ensemble": 5}, "'ensemble' must be a list of model refs"),
    ("name-climbs", {"models": {"../../x": {"versions": [1]}}}, "is not allowed"),
]


@pytest.mark.parametrize("kind,change,problem", INDEX_DAMAGE, ids=[d[0] for d in INDEX_DAMAGE])
def test_a_registry_index_with_wrong_types_is_a_clear_error(kind, change, problem, pkg, tmp_path, monkeypatch,
                                                            capsys):
    home = tmp_path / "home"
    monkeypatch.setenv("LUMBARSEG_HOME", str(home))
    reg = Registry(home / "models")
    reg.publish(pkg, make_default=True, catalog=Catalog.around(reg))
    data = json.loads(reg.index_path.read_text())
    reg.index_path.write_text(json.dumps({**data, **change}))
    assert main(["models"]) == 1
    err = capsys.readouterr().err
    assert problem in err and "Traceback" not in err, err
    with pytest.raises(PackageError, match="repair it"):
        reg.index()


def test_a_tiny_file_declaring_a_huge_volume_is_refused_before_allocating(tmp_path):
    img = sitk.Image([8, 8, 4], sitk.sitkInt16)
    p = tmp_path / "huge.nii.gz"
    sitk.WriteImage(img, str(p))
    with gzip.open(p, "rb") as f:
        raw = bytearray(f.read())
    raw[40:56] = struct.pack("<8h", 3, 600, 1500, 1500, 1, 1, 1, 1)  # dim[] of a 1.35 G-voxel volume
    with gzip.open(p, "wb") as f:
        f.write(bytes(raw[:352]) + bytes(1 << 20))
    t0 = time.perf_counter()
    with pytest.raises(VolumeReadError, match=r"declares 600 x 1500 x 1500 voxels.*header is damaged"):
        read_volume(p)
    assert time.perf_counter() - t0 < 20


# ============================================================================ 9. the manifest's meaning is sealed
def test_swapping_classes_in_the_manifest_is_detected(pkg, tmp_path, capsys):
    bad = tmp_path / "swapped"
    shutil.copytree(pkg.path, bad)
    m = json.loads((bad / "manifest.json").read_text())
    classes = m["schema"]["classes"]
    fg = [c for c in classes if c["value"] != 0]
    fg[0]["value"], fg[1]["value"] = fg[1]["value"], fg[0]["value"]
    (bad / "manifest.json").write_text(json.dumps(m))
    src = write_volume(sagittal(), tmp_path / "in.nrrd")
    rc = main(["segment", str(src), "-o", str(tmp_path / "s.nii.gz"), "--model", str(bad), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "manifest.json was changed after the package was made" in err
    assert not (tmp_path / "s.nii.gz").exists()


def test_removing_the_integrity_record_is_refused_outside_the_shipped_registry(pkg, tmp_path):
    bad = tmp_path / "unsealed"
    shutil.copytree(pkg.path, bad)
    m = json.loads((bad / "manifest.json").read_text())
    del m["integrity"]
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PackageError, match="no integrity record.*publish it again"):
        read_package(bad).verify()


def test_the_shipped_packages_still_load():
    from LumbarSegmentLib.registry.package import shipped_registry_root

    for name in ("uvd-starter", "umd-starter"):
        read_package(shipped_registry_root() / name / "1").verify()


def test_cosmetic_manifest_fields_may_change_without_breaking_the_seal(pkg, tmp_path):
    p = tmp_path / "renamed"
    shutil.copytree(pkg.path, p)
    m = json.loads((p / "manifest.json").read_text())
    m["metrics"] = {"note": "re-evaluated"}
    m["version"] = 7
    (p / "manifest.json").write_text(json.dumps(m))
    read_package(p).verify()


# ============================================================================ 10./11./14. the registry
def test_publishing_a_package_named_dotdot_is_refused(pkg, tmp_path):
    bad = tmp_path / "dots"
    shutil.copytree(pkg.path, bad)
    m = json.loads((bad / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps({**m, "name": ".."}))
    with pytest.raises(PackageError, match="not allowed"):
        inner = Registry(tmp_path / "reg" / "inner")
        inner.publish(read_package(bad), catalog=Catalog.around(inner))
    assert not (tmp_path / "reg").exists() or everything_in(tmp_path / "reg") in ([], ["inner"])


CONCURRENT_PUBLISH = r'''
import sys, time
from LumbarSegmentLib.registry.package import read_package
from LumbarSegmentLib.registry.registry import Registry
from LumbarSegmentLib.registry.catalog import Catalog
start = float(sys.argv[3])
while time.time() < start:
    time.sleep(0.005)
reg = Registry(sys.argv[1])
reg.publish(read_package(sys.argv[2]), catalog=Catalog.around(reg))
'''


def test_eight_concurrent_publishes_all_reach_the_index(pkg, tmp_path):
    root = tmp_path / "reg"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "Testing")])}
    start = str(time.time() + 4)
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_PUBLISH, str(root), str(pkg.path), start],
                              env=env, cwd=str(ROOT), stderr=subprocess.PIPE, text=True) for _ in range(8)]
    errs = [p.communicate(timeout=180)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, errs
    index = json.loads((root / "index.json").read_text())
    assert index["models"]["uvd-rel2"]["versions"] == list(range(1, 9))
    assert sorted(int(p.name) for p in (root / "uvd-rel2").iterdir()) == list(range(1, 9))


def test_published_files_get_the_usual_permissions(pkg, tmp_path):
    src = tmp_path / "private"
    shutil.copytree(pkg.path, src)
    os.chmod(src / "weights.safetensors", 0o600)
    old = os.umask(0o022)
    try:
        reg = Registry(tmp_path / "reg")
        p = reg.publish(read_package(src), catalog=Catalog.around(reg))
    finally:
        os.umask(old)
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in (p.path / "weights.safetensors", p.path / "manifest.json",
                                                               tmp_path / "reg" / "index.json")}
    assert set(modes.values()) == {0o644}, modes


# ============================================================================ 12. NIfTI qform vs sform
def test_a_nifti_whose_qform_and_sform_disagree_is_refused(tmp_path):
    p = tmp_path / "two.nii"
    write_volume(sagittal(), p, compress=False)
    raw = bytearray(p.read_bytes())
    qcode, scode = struct.unpack("<2h", raw[252:256])
    assert qcode > 0 and scode > 0  # ITK writes both
    srow_x = list(struct.unpack("<4f", raw[280:296]))
    srow_x[3] += 25.0  # the sform places the image 25 mm further left
    raw[280:296] = struct.pack("<4f", *srow_x)
    p.write_bytes(bytes(raw))
    with pytest.raises(VolumeReadError, match=r"qform and sform.*25\.0 mm apart.*Make them agree"):
        read_volume(p)


# ============================================================================ 13. fractional labels in training
def test_a_training_label_map_with_fractional_values_is_refused(tmp_path):
    from LumbarSegmentLib.dataset.cases import CaseError, read_case, write_case

    image = sagittal()
    label = image.with_array(np.zeros(image.shape, np.uint8))
    case = write_case(tmp_path, "c1", image, label, labels={1: "vertebral_body", 2: "intervertebral_disc"},
                      annotated_structures=["vertebral_body", "intervertebral_disc"])
    frac = np.zeros(image.shape, np.float32)
    frac[:, 5:10, 5:10], frac[:, 20:25, 5:10] = 1.5, 2.5
    write_volume(image.with_array(frac), case.label_path)
    with pytest.raises(CaseError, match=r"not whole label numbers 0\.\.255 \(1\.5, 2\.5\).*nearest-neighbour"):
        read_case(case.json_path).load()


# ============================================================================ 15. SIGTERM and stale temporaries
SIGTERM_DURING_WRITE = r'''
import sys, time
import LumbarSegmentLib.formats.preview as preview
def slow(*a, **k):
    print("writing", flush=True)
    time.sleep(60)
preview.render_preview = slow
from LumbarSegmentLib.cli.main import main
sys.exit(main(sys.argv[1:]))
'''


def test_sigterm_during_the_write_phase_leaves_nothing(pkg, tmp_path):
    src = write_volume(sagittal(), tmp_path / "in.nrrd")
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "Testing")])}
    p = subprocess.Popen([sys.executable, "-c", SIGTERM_DURING_WRITE, "segment", str(src), "-o", str(out / "l.nii.gz"),
                          "--preview", str(out / "p.png"), "--model", str(pkg.path), "--device", "cpu",
                          "--no-progress"], env=env, cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "writing"
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 1 and "interrupted" in err, err
    assert everything_in(out) == []


def test_stale_temporaries_of_a_killed_run_are_swept(pkg, tmp_path):
    from LumbarSegmentLib.core.files import make_partial

    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = make_partial(out / "l.nii.gz")
    stale = stale.rename(stale.with_name(stale.name.replace(f".{os.getpid()}@", f".{dead.stdout.strip()}@")))
    live = make_partial(out / "l.nii.gz")  # this process is alive: never touched
    src = write_volume(sagittal(), tmp_path / "in.nrrd")
    assert segment(str(src), "-o", str(out / "l.nii.gz"), pkg=pkg) == 0
    assert not stale.exists() and live.exists()


# ============================================================================ 16./17. geometry and sizes
def test_a_sagittal_stack_with_oblong_pixels_is_not_called_axial(tmp_path):
    from LumbarSegmentLib.core.geometry import sagittal_layout

    # i -> posterior (2 mm), j -> inferior (0.5 mm), k -> left (1 mm): sagittal slices, oblong pixels
    v = Volume(np.zeros((8, 40, 20), np.int16), spacing=(2.0, 0.5, 1.0), direction=SAGITTAL)
    layout = sagittal_layout(v)
    assert not layout.resliced and layout.slice_spacing == 1.0
    axial = Volume(np.zeros((8, 40, 40), np.int16), spacing=(0.8, 0.8, 4.0))
    with pytest.raises(VolumeError, match="axial stack"):
        sagittal_layout(axial)


def test_a_header_spacing_that_would_explode_the_model_plane_is_refused(pkg):
    from LumbarSegmentLib.core.checks import ImplausibleInput, check_segmentable

    big = np.broadcast_to(np.int16(1), (5, 2000, 2000))  # 2000 x 2000 pixels, no memory used
    # 3 mm pixels: a 6 m field of view (the 3.5 GB, 157 s case)
    with pytest.raises(ImplausibleInput, match="cover 6e\\+03 x 6e\\+03 mm.*which no spine MR does"):
        check_segmentable(Volume(big, spacing=(3.0, 3.0, 3.0), direction=SAGITTAL), [pkg])

    class FineModel:  # a model of 0.25 mm pixels would blow 0.7 mm slices up to 5600 x 5600
        spacing = (0.25, 0.25)

    with pytest.raises(ImplausibleInput, match="each slice would be 5600 x 5600 pixels"):
        check_segmentable(Volume(big, spacing=(0.7, 0.7, 3.0), direction=SAGITTAL), [FineModel()])


@pytest.mark.parametrize("tile,rc", [("0", 2), ("-64", 2), ("1", 2), ("100000", 2), ("abc", 2)])
def test_nonsense_tile_sizes_are_refused_up_front(tile, rc, pkg, tmp_path, capsys):
    src = write_volume(sagittal(), tmp_path / "in.nrrd")
    try:
        got = segment(str(src), "-o", str(tmp_path / "s.nii.gz"), "--tile", tile, pkg=pkg)
    except SystemExit as exc:  # argparse: usage message, status 2
        got = exc.code
    assert got == rc and "--tile" in capsys.readouterr().err
    assert not (tmp_path / "s.nii.gz").exists()


# ============================================================================ 18. clear messages
def test_an_unreadable_model_version_is_a_clear_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LUMBARSEG_HOME", str(tmp_path / "home"))
    src = write_volume(sagittal(), tmp_path / "in.nrrd")
    assert segment(str(src), "-o", str(tmp_path / "s.nii.gz"), "--model", "uvd-starter@abc") == 1
    err = capsys.readouterr().err
    assert "uvd-starter@abc" in err and "whole number" in err and "Traceback" not in err


@pytest.mark.parametrize("flag,name,problem", [("-o", "s.nhdr", "a label map"), ("--preview", "p.nii.gz", "a PNG"),
                                               ("--report", "r.nrrd", "a JSON report"),
                                               ("--seg-nrrd", "s.nrrd", "a Slicer segmentation")])
def test_a_wrong_output_type_is_refused_before_inference(flag, name, problem, pkg, tmp_path, capsys, monkeypatch):
    import LumbarSegmentLib.inference.engine as engine

    def never(*a, **k):
        raise AssertionError("inference must not start")

    monkeypatch.setattr(engine, "segment_volume", never)
    src = write_volume(sagittal(), tmp_path / "in.nrrd")
    args = [str(src), "-o", str(tmp_path / ("s.nii.gz" if flag != "-o" else name))]
    if flag != "-o":
        args += [flag, str(tmp_path / name)]
    assert segment(*args, pkg=pkg) == 1
    err = capsys.readouterr().err
    assert problem in err and name in err and ".partial" not in err, err
    assert [n for n in everything_in(tmp_path) if n != "in.nrrd"] == []


def test_an_uncompressed_nifti_named_nii_gz_is_read_by_its_content(tmp_path):
    p = write_volume(sagittal(), tmp_path / "plain.nii", compress=False)
    renamed = p.rename(tmp_path / "plain.nii.gz")
    assert np.array_equal(read_volume(renamed).array, sagittal().array)


def test_a_full_disk_is_a_sentence_not_a_bare_errno(pkg, tmp_path, monkeypatch, capsys):
    import LumbarSegmentLib.formats.io as lio

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lio, "write_volume", full)
    src = write_volume(sagittal(), tmp_path / "in.nrrd")
    out = tmp_path / "out"
    out.mkdir()
    assert segment(str(src), "-o", str(out / "s.nii.gz"), pkg=pkg) == 1
    err = capsys.readouterr().err
    assert "the disk is full" in err and "free some disk space" in err and "[Errno" not in err, err
    assert everything_in(out) == []


# ============================================================================ 19. nonsense in, refused
@pytest.mark.parametrize("kind,problem", [
    ("1x1x2", "too small to be an MR slice"),
    ("noise", "looks like random noise"),
    ("micro-pixels", "which no spine MR does"),
])
def test_nonsense_volumes_are_refused_not_segmented(kind, problem, pkg, tmp_path, capsys):
    rng = np.random.default_rng(0)
    if kind == "1x1x2":
        v = Volume(np.array([[[1]], [[2]]], np.int16))
    elif kind == "noise":
        v = Volume((rng.random((6, 48, 40)) * 1000).astype(np.int16), spacing=(1, 1, 3), direction=SAGITTAL)
    else:
        v = sagittal(spacing=(1e-6, 1e-6, 3.0))
    src = write_volume(v, tmp_path / "in.nrrd")
    out = tmp_path / "out"
    out.mkdir()
    assert segment(str(src), "-o", str(out / "s.nii.gz"), pkg=pkg) == 1
    err = capsys.readouterr().err
    assert problem in err and "Traceback" not in err, err
    assert everything_in(out) == []


def test_an_empty_result_is_flagged():
    from LumbarSegmentLib.core.checks import empty_result_warning

    v = sagittal()
    assert "the label map is empty" in empty_result_warning(v.with_array(np.zeros(v.shape, np.uint8)))
    lab = np.zeros(v.shape, np.uint8)
    lab[0, 0, 0] = 1
    assert empty_result_warning(v.with_array(lab)) is None


def test_train_into_an_existing_run_folder_without_resume_is_refused(tmp_path, capsys):
    from LumbarSegmentLib.training.cli import main as train_main

    run = tmp_path / "run"
    run.mkdir()
    (run / "progress.jsonl").write_text('{"event": "epoch"}\n')
    rc = train_main(["train", "--data", str(tmp_path / "nodata"), "--variant", "UD", "--out", str(run)])
    err = capsys.readouterr().err
    assert rc == 2 and "already holds a training run" in err and "--resume" in err
    assert everything_in(run) == ["progress.jsonl"]


# ============================================================================ checkpoints: tensors only
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the hostile pickle is made that way
def test_a_checkpoint_made_to_run_code_is_refused_without_running_it(tmp_path):
    from LumbarSegmentLib.training.trainer import load_checkpoint

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    ck = tmp_path / "last.pt"
    ck.write_bytes(pickle.dumps({"format": "lumbarsegment.checkpoint", "x": Evil()}))
    with pytest.raises(ValueError, match="refused without running anything"):
        load_checkpoint(ck)
    assert not marker.exists()


def test_a_checkpoint_round_trips_with_weights_only(tmp_path):
    import random

    import torch

    from LumbarSegmentLib.training.trainer import atomic_torch_save, load_checkpoint, rng_state, set_rng_state

    np.random.seed(3)
    random.seed(3)
    atomic_torch_save({"format": "lumbarsegment.checkpoint", "rng": rng_state(),
                       "history": [{"loss": np.float32(0.5)}]}, tmp_path / "last.pt")
    expect = (np.random.rand(), random.random(), torch.rand(1).item())
    set_rng_state(load_checkpoint(tmp_path / "last.pt")["rng"])
    assert (np.random.rand(), random.random(), torch.rand(1).item()) == expect


def test_train_with_a_precision_the_device_cannot_run_is_one_line_not_a_traceback(tmp_path, capsys):
    """The device and precision checks raise EngineError (not ValueError); the training command used to
    let it through as a traceback (seen asking for bf16 on a CPU without it). fp16 on the CPU is refused
    on every machine, so this checks the same path anywhere."""
    from LumbarSegmentLib.dataset.cases import write_case
    from LumbarSegmentLib.training.cli import main as train_main
    from LumbarSegmentLib.core.volume import Volume

    image = Volume(np.zeros((4, 8, 8), np.int16))
    lab = np.zeros((4, 8, 8), np.uint8)
    lab[1, 2:5, 2:5] = 1
    for i in range(2):
        write_case(tmp_path / "data", f"c{i}", image, image.with_array(lab), labels={1: "vertebral_body"},
                   annotated_structures=["vertebral_body"])
    run = tmp_path / "run"
    rc = train_main(["train", "--data", str(tmp_path / "data"), "--cases", "c0,c1", "--val-cases", "c1",
                     "--variant", "UD", "--device", "cpu", "--precision", "fp16", "--out", str(run)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert "fp16" in err and "--precision bf16 or fp32" in err and len(err.strip().splitlines()) == 1, err
