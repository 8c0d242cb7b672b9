"""Packaging: the Python claim holds for the pins, the wheel carries models and schemas, and an
installed wheel (not the checkout) lists its models and segments a real sagittal DICOM series.

The wheel test is marked ``slow`` (about 20-40 s here: a wheel build, a fresh venv and one small
segmentation). It stays offline: the wheel is built without build isolation and installed with
``--no-deps``; the fresh venv borrows the dependencies (torch, numpy, highdicom, ...) of the running
interpreter through a ``.pth`` path entry, which adds their folder to ``sys.path`` without running the
editable-install hook found there, so ``LumbarSegmentLib`` can only come from the wheel.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _min_python(spec: str) -> tuple[int, ...]:
    m = re.search(r">=\s*(\d+(?:\.\d+)*)", spec or "")
    assert m, f"no lower bound in {spec!r}"
    return tuple(int(x) for x in m.group(1).split("."))


def _exact_pins() -> dict[str, str]:
    """Every exact ``name==version`` pin: the torch pin of scripts/setup_env.sh and pyproject's."""
    pins = {}
    m = re.search(r'torch==\$\{LUMBARSEG_TORCH:-([\d.]+)\}', (ROOT / "scripts" / "setup_env.sh").read_text())
    assert m, "scripts/setup_env.sh no longer pins torch the way this test reads it"
    pins["torch"] = m.group(1)
    proj = _pyproject()["project"]
    reqs = list(proj["dependencies"]) + [r for extra in proj.get("optional-dependencies", {}).values() for r in extra]
    for r in reqs:
        mm = re.match(r"\s*([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*==\s*([\w.]+)", r)
        if mm:
            pins[mm.group(1).lower()] = mm.group(2)
    return pins


def test_python_claim_is_one_the_pins_satisfy():
    """requires-python may not promise a Python that a pinned dependency has no release for."""
    claim = _min_python(_pyproject()["project"]["requires-python"])
    assert sys.version_info[:len(claim)] >= claim  # CI runs on a Python we claim
    checked = []
    for name, version in _exact_pins().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        if installed.split("+")[0] != version:
            continue  # a different version here: its metadata says nothing about the pin
        needs = metadata.metadata(name).get("Requires-Python")
        if needs:
            assert _min_python(needs) <= claim, (
                f"{name}=={version} needs Python {needs}, but pyproject claims {claim}: raise requires-python")
        checked.append(name)
    assert "torch" in checked, "the torch pin of scripts/setup_env.sh is not the torch installed here"
    readme = (ROOT / "README.md").read_text()
    shown = ".".join(map(str, claim))
    assert f"Python ≥ {shown}" in readme or f"Python >= {shown}" in readme, "README states another Python"
    assert "3.9" not in re.sub(r"\d+\.\d+\.\d+", "", readme.split("## Install")[1].split("\n## ")[0])


def test_setup_script_cannot_pull_a_cuda_build_by_accident():
    """On Linux the default index serves a CUDA torch: the script must name the CPU index there."""
    text = (ROOT / "scripts" / "setup_env.sh").read_text()
    assert "download.pytorch.org/whl/cpu" in text and "Linux" in text


def test_every_subpackage_and_data_folder_is_listed():
    tool = _pyproject()["tool"]["setuptools"]
    listed = set(tool["packages"])
    # every folder Python would import from (code or data) inside the project's top-level packages
    tops = [t for t in ("LumbarSegmentLib", "LumbarSegmentWeb") if (ROOT / t).is_dir()]
    found = {".".join(d.relative_to(ROOT).parts) for t in tops for d in [ROOT / t, *(ROOT / t).rglob("*")]
             if d.is_dir() and "__pycache__" not in d.parts and any(f.is_file() for f in d.iterdir())
             and d.name.isidentifier()}
    assert found <= listed, f"packages missing from pyproject: {sorted(found - listed)}"
    assert "LumbarSegmentLib.schemas" in listed and tool["package-data"]["LumbarSegmentLib.schemas"] == ["*.json"]
    assert "LumbarSegmentLib.schemas.terminology" in listed
    from LumbarSegmentLib.registry.package import shipped_registry_root

    mapped = ROOT / tool["package-dir"]["LumbarSegmentLib.shipped_models"]
    assert mapped == shipped_registry_root(), "the wheel must carry the registry the checkout uses"
    assert (mapped / "index.json").is_file()
    lic = _pyproject()["project"]["license"]
    assert isinstance(lic, str), "licence must be an SPDX string (a TOML table is deprecated)"


# ------------------------------------------------------------------------------------------- the wheel itself
def _clean_checkout(dest: Path) -> Path:
    """Tracked and new (not ignored) files only: what a fresh clone of this working tree would hold."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to know which files are part of the project")
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, names):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


@pytest.mark.slow
def test_wheel_from_a_clean_checkout_installs_lists_models_and_writes_a_dicom_seg(tmp_path):
    pytest.importorskip("highdicom")
    src = _clean_checkout(tmp_path / "checkout")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-v",
                            "-w", str(tmp_path / "dist")], cwd=src, capture_output=True, text=True)
    log = built.stdout + built.stderr
    assert built.returncode == 0, log[-3000:]
    warnings = [ln for ln in log.splitlines()
                if re.search(r"SetuptoolsDeprecationWarning|SetuptoolsWarning|Package would be ignored|"
                             r"License classifiers|project\.license", ln)]
    assert not warnings, "setuptools warns:\n" + "\n".join(warnings)
    wheel = next((tmp_path / "dist").glob("lumbarsegment-*.whl"))
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    from LumbarSegmentLib.registry.package import shipped_registry_root

    index = json.loads((shipped_registry_root() / "index.json").read_text())
    for name, entry in index["models"].items():
        for v in entry["versions"]:
            for f in ("manifest.json", "weights.safetensors"):
                assert f"LumbarSegmentLib/shipped_models/{name}/{v}/{f}" in names
    assert "LumbarSegmentLib/shipped_models/index.json" in names and "LumbarSegmentLib/schemas/starter.json" in names
    assert "LumbarSegmentLib/schemas/terminology/LumbarSegment.term.json" in names

    # a fresh venv; the wheel goes in with the running pip, dependencies are borrowed (see module doc)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    vpy = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(vpy), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True)
    site = Path(subprocess.run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "borrowed_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "LUMBARSEG_HOME": str(tmp_path / "home"), "PYTHONPATH": ""}

    def run(*args):
        r = subprocess.run([str(venv / "bin" / "lumbarseg"), *args], cwd=work, env=env, capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    where = subprocess.run([str(vpy), "-c", "import LumbarSegmentLib; print(LumbarSegmentLib.__file__)"], cwd=work,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).resolve().is_relative_to(venv.resolve()), f"LumbarSegmentLib imported from {where}"
    rows = json.loads(run("models", "--json"))
    default = [r for r in rows if r["default"]]
    assert default and default[0]["ref"] == index["default"]
    assert str(venv.resolve()) in default[0]["registry"]  # the registry inside the installed wheel

    from test_dicom_seg import write_sample_series

    write_sample_series(work / "dicom", slices=3)
    out = run("segment", "dicom", "-o", "seg.nii.gz", "--dicom-seg", "seg.dcm", "--device", "cpu", "--no-progress")
    assert "seg.dcm" in out
    import highdicom as hd
    import pydicom

    seg = hd.seg.segread(work / "seg.dcm")
    first = pydicom.dcmread(sorted((work / "dicom").iterdir())[0], stop_before_pixels=True)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    name, version = index["default"].split("@")
    manifest = json.loads((shipped_registry_root() / name / version / "manifest.json").read_text())
    classes = [c["name"] for c in manifest["schema"]["classes"] if c["value"] != 0]
    assert [s.SegmentLabel for s in seg.SegmentSequence] == classes  # every class of the default, in order
    assert classes[:2] == ["Vertebral body", "Intervertebral disc"]


def test_extensions_index_entry_agrees_with_the_cmake_metadata():
    """LumbarSegment.json is what Slicer's Extensions Index takes; the rest lives in CMakeLists.txt."""
    entry = json.loads((ROOT / "LumbarSegment.json").read_text())
    allowed = {"$schema", "build_dependencies", "build_subdirectory", "category", "enabled", "scm_revision",
               "scm_type", "scm_url", "tier"}  # the catalog schema (v1.0.1) allows no other key
    assert set(entry) <= allowed and {"$schema", "category", "scm_url"} <= set(entry)
    assert "slicer-extension-catalog-entry-schema-v1.0.1.json" in entry["$schema"]
    cmake = (ROOT / "CMakeLists.txt").read_text()

    def cmake_value(key):
        m = re.search(rf'set\({key} "([^"]*)"\)', cmake)
        assert m, key
        return m.group(1)

    assert entry["category"] == cmake_value("EXTENSION_CATEGORY")
    assert entry["build_dependencies"] == cmake_value("EXTENSION_DEPENDS").split()
    # the icon and screenshot URLs point at files that exist in the repository
    for key in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        for url in cmake_value(key).split():
            rel = url.split("/main/", 1)[1]
            assert (ROOT / rel).is_file(), f"{key}: {rel} is not in the repository"
            from PIL import Image

            with Image.open(ROOT / rel) as im:
                assert im.format == "PNG" and min(im.size) >= 128


def test_docs_name_no_machine_paths():
    bad = re.compile(r"(?<![\w.])/(?:work|home|root|Users)/[\w.-]+")
    hits = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in [*(ROOT / "docs").glob("*.md"), ROOT / "README.md"]
            for m in bad.finditer(p.read_text())]
    assert not hits, hits
