"""Model packages (safetensors + manifest + sha256) and the registry's atomic publishing."""
import json
import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

from LumbarSegmentLib.registry.packages import (PackageError, Registry, read_package, resolve_model, sha256_file,
                                       write_package)
from LumbarSegmentLib.core.schema import load_schema
from conftest import make_package


def test_package_round_trip(tmp_path):
    pkg = make_package(tmp_path / "p", "UMD")
    m = pkg.manifest
    assert m["format"] == "lumbarsegment.model" and m["weights"]["sha256"] == sha256_file(tmp_path / "p" / m["weights"]["file"])
    assert m["input"]["plane"] == "sagittal" and m["input"]["normalisation"]["method"] == "zscore_nonzero"
    assert pkg.schema.ids == load_schema("starter").ids
    model = pkg.load_model()
    x = torch.randn(1, 1, 64, 64)
    assert model(x).shape == (1, 3, 64, 64)
    with pytest.raises(PackageError, match="not empty"):
        make_package(tmp_path / "p")


def test_tampered_weights_are_refused(tmp_path):
    pkg = make_package(tmp_path / "p")
    w = tmp_path / "p" / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(PackageError, match="checksum mismatch"):
        read_package(tmp_path / "p").load_model()


def test_pickle_weights_are_refused_without_unpickling(tmp_path):
    """A pickle that would create a file when unpickled: refused, and the file never appears."""
    pkg = make_package(tmp_path / "p")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    w = tmp_path / "p" / "weights.safetensors"
    w.write_bytes(pickle.dumps(Evil(), protocol=2))
    m = json.loads((tmp_path / "p" / "manifest.json").read_text())
    m["weights"]["sha256"] = sha256_file(w)  # even with a matching checksum
    (tmp_path / "p" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PackageError, match="pickle"):
        read_package(tmp_path / "p").load_model()
    assert not marker.exists()
    # a torch.save zip checkpoint is refused too
    torch.save({"a": torch.zeros(2)}, w)
    m["weights"]["sha256"] = sha256_file(w)
    (tmp_path / "p" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PackageError, match="pickle"):
        read_package(tmp_path / "p").load_model()


def test_newer_manifest_and_foreign_files_are_refused(tmp_path):
    make_package(tmp_path / "p")
    mp = tmp_path / "p" / "manifest.json"
    m = json.loads(mp.read_text())
    mp.write_text(json.dumps({**m, "format_version": 99}))
    with pytest.raises(PackageError, match="newer"):
        read_package(tmp_path / "p")
    mp.write_text(json.dumps({**m, "weights": {**m["weights"], "file": "../../etc/passwd"}}))
    with pytest.raises(PackageError, match="safetensors file inside"):
        read_package(tmp_path / "p")
    mp.write_text("{not json")
    with pytest.raises(PackageError, match="cannot read manifest"):
        read_package(tmp_path / "p")
    with pytest.raises(PackageError, match="no manifest"):
        read_package(tmp_path)


def test_registry_versions_default_and_resolution(tmp_path):
    reg = Registry(tmp_path / "reg")
    a = reg.publish(make_package(tmp_path / "a", name="uvd-x"))
    assert a.ref == "uvd-x@1" and reg.default_ref() == "uvd-x@1"
    b = reg.publish(make_package(tmp_path / "b", name="uvd-x", seed=3))
    assert b.ref == "uvd-x@2" and reg.default_ref() == "uvd-x@1"  # not default unless asked
    reg.publish(make_package(tmp_path / "c", "UMD", name="umd-x"), make_default=True, ensemble=["uvd-x@2", "umd-x@1"])
    assert reg.default_ref() == "umd-x@1" and reg.ensemble_refs() == ["uvd-x@2", "umd-x@1"]
    assert [p.ref for p in reg.packages()] == ["umd-x@1", "uvd-x@1", "uvd-x@2"]
    assert resolve_model("uvd-x@1", [reg]).version == 1
    assert resolve_model(None, [reg]).ref == "umd-x@1"
    assert resolve_model(str(tmp_path / "a")).name == "uvd-x"
    with pytest.raises(PackageError, match="no version 7"):
        reg.get("uvd-x@7")
    with pytest.raises(PackageError, match="no model 'nope'"):
        reg.get("nope")
    with pytest.raises(PackageError, match="read-only"):
        Registry(tmp_path / "reg", read_only=True).publish(a)


def test_publish_crash_leaves_registry_pointing_at_whole_models(tmp_path):
    """Kill the publishing process mid-copy: the index still names only complete packages."""
    reg = Registry(tmp_path / "reg")
    reg.publish(make_package(tmp_path / "a", name="m"))
    make_package(tmp_path / "b", name="m", seed=5)
    script = textwrap.dedent(f"""
        import os, shutil
        from LumbarSegmentLib.registry.packages import Registry, read_package
        real = shutil.copy2
        def dying_copy(src, dst, *a, **k):
            real(src, dst, *a, **k)
            with open(dst, "r+b") as f:
                f.truncate(100)   # half-written weights
            os._exit(9)           # killed before verify/rename/index
        shutil.copy2 = dying_copy
        Registry({str(tmp_path / 'reg')!r}).publish(read_package({str(tmp_path / 'b')!r}), make_default=True)
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=os.getcwd())
    assert r.returncode == 9
    idx = reg.index()
    assert idx["default"] == "m@1" and idx["models"]["m"]["versions"] == [1]
    reg.get("m").load_model()  # the default still loads and verifies
    assert not (tmp_path / "reg" / "m" / "2").exists()
    # the next publish works and takes a fresh version
    assert reg.publish(read_package(tmp_path / "b")).version == 2
