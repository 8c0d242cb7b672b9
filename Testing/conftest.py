"""Shared pytest fixtures.

The real data lives outside the repository, in ``<workspace>/shared/data`` (see its
README.md); tests that need it ask for the ``shared_data`` fixture and are skipped,
with the reason, when it is absent (e.g. on a CI runner without the data).
"""
from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _quiet_libraries() -> None:
    """VTK's own logger prints its errors in red straight to the terminal (e.g. a slice view asked to
    colour a volume before its lookup table is set, harmless to what the tests check); in a test run they
    read like failures. The tests check what the code does, not VTK's chatter: keep it off the terminal."""
    if importlib.util.find_spec("vtkmodules") is None:
        return
    from vtkmodules.vtkCommonCore import vtkLogger, vtkObject

    vtkLogger.SetStderrVerbosity(vtkLogger.VERBOSITY_OFF)
    vtkObject.GlobalWarningDisplayOff()
    # trame-slicer's preview task is still pending when the in-process web tests' event loop is gone; asyncio
    # reports it ("Task was destroyed but it is pending!") as the interpreter exits
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)


_quiet_libraries()


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Converted networks (ONNX, OpenVINO) go to a folder of the test run, not the user's cache: the
    warm worker drafts through OpenVINO where it is installed, and a test must not leave files behind."""
    import os

    if os.environ.get("LUMBARSEG_CACHE"):
        yield
        return
    os.environ["LUMBARSEG_CACHE"] = str(tmp_path_factory.mktemp("lumbarseg-cache"))
    yield
    os.environ.pop("LUMBARSEG_CACHE", None)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder holding ``lumbar-mr/`` and ``spider-masks/``; skips the test when it is missing."""
    if not (SHARED_DATA / "lumbar-mr").is_dir() or not (SHARED_DATA / "spider-masks").is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (needs lumbar-mr/ and spider-masks/); "
                    f"these tests only run in a checkout next to the shared data folder")
    return SHARED_DATA


# --- small model packages for plumbing tests (random weights, tiny widths) -------------------
def make_package(folder, variant="UVD", *, schema="starter", init_filters=4, seed=0, name=None, spacing=(1.0, 1.0)):
    """A freshly initialised model package (random weights): enough to test the plumbing."""
    import torch

    from LumbarSegmentLib.models import build_model
    from LumbarSegmentLib.registry.package import default_input_contract, write_package
    from LumbarSegmentLib.core.schema import LabelSchema, load_schema

    schema = schema if isinstance(schema, LabelSchema) else load_schema(schema)
    torch.manual_seed(seed)
    model = build_model(variant, num_classes=schema.num_classes, init_filters=init_filters)
    model.eval()
    # a random model trained on no case: its (empty) training provenance is recorded and sealed like a real one's
    return write_package(folder, model, name=name or f"{variant.lower()}-tiny", schema=schema,
                         input_contract=default_input_contract(spacing_mm=spacing),
                         training={"train_cases": [], "val_cases": []})


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory):
    return make_package(tmp_path_factory.mktemp("pkg") / "uvd-tiny")


@pytest.fixture(scope="session")
def tiny_umd_package(tmp_path_factory):
    return make_package(tmp_path_factory.mktemp("pkg") / "umd-tiny", "UMD", seed=1)


@pytest.fixture(scope="session")
def small_real_volume(shared_data):
    """A real 1 mm sagittal case cropped to a few central slices (fast to segment)."""
    from LumbarSegmentLib.formats.io import read_volume
    from LumbarSegmentLib.core.volume import Volume

    v = read_volume(shared_data / "lumbar-mr" / "VB3_01_image.mha")
    import numpy as np

    k, j, i = v.array.shape
    i0 = i // 2 - 3
    origin = np.asarray(v.origin) + v.direction[:, 0] * v.spacing[0] * i0  # keep physical positions
    return Volume(v.array[:, :, i0:i0 + 6].copy(), spacing=v.spacing, origin=origin, direction=v.direction)


def central_slices(path, n: int):
    """``n`` central sagittal slices of the volume at ``path``, at their physical positions (a short stack
    of a real 1 mm case for engine tests)."""
    from LumbarSegmentLib.core.volume import Volume
    from LumbarSegmentLib.formats.io import read_volume

    v = read_volume(str(path))
    i0 = v.array.shape[2] // 2 - n // 2
    origin = np.asarray(v.origin) + v.direction[:, 0] * v.spacing[0] * i0
    return Volume(v.array[:, :, i0:i0 + n].copy(), spacing=v.spacing, origin=origin, direction=v.direction)


def load_script(path, name: str):
    """Import a script that is not part of a package (bench/, scripts/) as module ``name``, so a test
    can call its ``main``; registered in ``sys.modules`` so its dataclasses and pickling work."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def wait_for_server(proc, url: str, log_path, log=None, timeout: float = 90) -> None:
    """Wait until a server the test started answers ``url``; fail with the end of its log if it exits or
    does not answer within ``timeout`` seconds (the process is killed and ``log`` closed then)."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                if log is not None:
                    log.close()
                pytest.fail(f"the web server did not start:\n{Path(log_path).read_text()[-3000:]}")
            time.sleep(0.5)


def stop_server(proc, log) -> None:
    """End a server the test started (terminate, then kill if it lingers) and close its log."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture
def publish_spy(monkeypatch):
    """The publish gate replaced by a recorder: what ``lumbarseg-train publish`` hands to
    ``publish_if_better`` (the policy and the keyword arguments), without grading anything."""
    from LumbarSegmentLib.training import publish

    seen: dict = {}

    def fake(pkg, registry, policy, **kw):
        seen.update(kw, policy=policy)
        return {"ref": "x@2", "default": False, "reason": "r", "table": "", "comparison": None,
                "registry": str(registry.root)}

    monkeypatch.setattr(publish, "publish_if_better", fake)
    monkeypatch.setattr(publish, "read_package", lambda p: None)
    return seen


def graph_prefix(package) -> str:
    """The start of a package's cached graph names: weights and architecture (runners.graph_key)."""
    from LumbarSegmentLib.inference.runners import graph_key

    return graph_key(package.sha256, package.manifest["architecture"])[:32]
