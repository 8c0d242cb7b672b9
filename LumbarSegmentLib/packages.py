"""Model packages (manifest + safetensors weights) and the local model registry.

A **model package** is a folder::

    manifest.json           what the model is, what it expects, how it was made
    weights.safetensors     the weights; safetensors cannot carry code (no pickle)

``manifest.json`` (format version 1, documented in docs/formats.md)::

    {"format": "lumbarsegment.model", "format_version": 1,
     "name": "uvd-starter", "version": 1,
     "architecture": {builder arguments for LumbarSegmentLib.models.build_model},
     "schema": {a full label schema, see schema.py},
     "input": {"modality": "MR", "sequences": [...], "plane": "sagittal",
               "spacing_mm": [row, col], "normalisation": {"method": "zscore_nonzero"},
               "patch_size": [256, 256], "channels": 1},
     "training": {"data_manifest_sha256", "epochs", "folds", "date", "code_version", ...},
     "metrics": {...validation metrics...},
     "weights": {"file": "weights.safetensors", "sha256": "...", "dtype": "float16"}}

Loading verifies the sha256 of the weights before reading a byte of them as tensors
and refuses a mismatch, a pickle, or a manifest from a newer format.

A **registry** is a folder ``<root>/<name>/<version>/`` of packages plus ``index.json``
naming the default model (and the default ensemble). Publishing copies into a
temporary folder, verifies it, renames it into place, and only then rewrites the
index (itself written to a temporary file and renamed): a crash at any point
leaves the index pointing at whole packages only.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .files import pid_alive, sha256_file, umask  # sha256_file stays importable from here
from .schema import LabelSchema

MODEL_FORMAT = "lumbarsegment.model"
MODEL_FORMAT_VERSION = 1
REGISTRY_FORMAT = "lumbarsegment.registry"
REGISTRY_FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"


def shipped_registry_root() -> Path:
    """The read-only registry of models that ship with LumbarSegment (the one place to look it up).

    A wheel carries it as the data-only package ``LumbarSegmentLib/shipped_models`` (pyproject maps
    ``Resources/Models`` there); a source checkout and the installed Slicer extension keep it in
    ``Resources/Models`` beside ``LumbarSegmentLib/``. The in-package copy wins when it has an index,
    so an unrelated ``Resources/`` folder next to an installed package is never mistaken for it.
    """
    here = Path(__file__).resolve().parent
    packaged = here / "shipped_models"
    if (packaged / "index.json").is_file():
        return packaged
    return here.parent / "Resources" / "Models"


class PackageError(ValueError):
    """A model package or registry is missing, malformed, tampered with or unsafe."""


def code_version() -> str:
    from . import __version__

    return __version__


def default_input_contract(spacing_mm=(1.0, 1.0), patch=(256, 256)) -> dict:
    return {"modality": "MR", "sequences": ["T1w", "T2w"], "plane": "sagittal",
            "spacing_mm": [float(s) for s in spacing_mm],
            "normalisation": {"method": "zscore_nonzero"}, "patch_size": [int(p) for p in patch], "channels": 1}


@dataclass
class ModelPackage:
    path: Path
    manifest: dict

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> int:
        return int(self.manifest["version"])

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def sha256(self) -> str:
        return self.manifest["weights"]["sha256"]

    @property
    def schema(self) -> LabelSchema:
        return LabelSchema.from_dict(self.manifest["schema"], where=f"{self.path}/manifest.json")

    @property
    def input(self) -> dict:
        return self.manifest["input"]

    @property
    def spacing(self) -> tuple[float, float]:
        return tuple(float(s) for s in self.input["spacing_mm"])

    @property
    def patch_size(self) -> tuple[int, int]:
        return tuple(int(s) for s in self.input.get("patch_size", (256, 256)))

    def verify(self) -> None:
        wfile = self.path / self.manifest["weights"]["file"]
        if not wfile.is_file():
            raise PackageError(f"{self.path}: weights file {wfile.name} is missing")
        _refuse_pickle(wfile)
        actual = sha256_file(wfile)
        if actual != self.sha256:
            raise PackageError(
                f"{self.path}: weights checksum mismatch (manifest says {self.sha256[:12]}…, file is "
                f"{actual[:12]}…). The file was changed or damaged; reinstall or re-publish this model."
            )

    def load_model(self, device="cpu"):
        """Verify the weights, build the architecture and load them (float32, eval mode)."""
        import torch
        from safetensors.torch import load_file

        from .models import build_model

        self.verify()
        try:
            state = load_file(str(self.path / self.manifest["weights"]["file"]))
        except Exception as exc:  # safetensors raises its own error types
            raise PackageError(f"{self.path}: cannot read weights as safetensors: {exc}") from None
        model = build_model(**self.manifest["architecture"])
        state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise PackageError(f"{self.path}: weights do not fit the architecture "
                               f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
        return model.to(device=torch.device(device)).eval()


def _refuse_pickle(path: Path) -> None:
    """Refuse a pickle / ``torch.save`` zip; a file that starts like a safetensors file passes.

    A safetensors file starts with its header length (8 bytes, little-endian) and then the
    JSON header's ``{``; that length can itself begin with the byte 0x80 or the letters
    "PK", so the safetensors shape is recognised first.
    """
    with open(path, "rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8:
        return
    if head[:2] == b"PK" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        raise PackageError(
            f"{path}: this is a PyTorch pickle/zip checkpoint, not safetensors. Pickles can run code when "
            f"loaded, so LumbarSegment refuses them. Ask for a safetensors model package; only if you fully "
            f"trust where the file came from, convert it with `lumbarseg-train export`."
        )
    if len(head) < 9:
        raise PackageError(f"{path}: weights file is truncated; reinstall or re-publish this model")


def read_package(path: str | os.PathLike) -> ModelPackage:
    path = Path(path)
    mpath = path / "manifest.json"
    if not mpath.is_file():
        raise PackageError(f"{path}: not a model package (no manifest.json)")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PackageError(f"{mpath}: cannot read manifest: {exc}") from None
    if manifest.get("format") != MODEL_FORMAT:
        raise PackageError(f"{mpath}: format is {manifest.get('format')!r}, expected {MODEL_FORMAT!r}")
    if int(manifest.get("format_version", 0)) > MODEL_FORMAT_VERSION:
        raise PackageError(
            f"{mpath}: model format version {manifest.get('format_version')} is newer than this "
            f"LumbarSegment supports ({MODEL_FORMAT_VERSION}); update LumbarSegment to use this model"
        )
    for key in ("name", "version", "architecture", "schema", "input", "weights"):
        if key not in manifest:
            raise PackageError(f"{mpath}: manifest lacks '{key}'")
    wname = manifest["weights"].get("file", "")
    if Path(wname).name != wname or not wname.endswith(".safetensors"):
        raise PackageError(f"{mpath}: weights must be a .safetensors file inside the package, got {wname!r}")
    if manifest["input"].get("plane", "sagittal") != "sagittal":
        raise PackageError(f"{mpath}: only sagittal models are supported")
    pkg = ModelPackage(path=path, manifest=manifest)
    pkg.schema  # validates the schema
    return pkg


def write_package(folder: str | os.PathLike, model, *, name: str, version: int = 1, schema: LabelSchema,
                  input_contract: dict | None = None, training: dict | None = None,
                  metrics: dict | None = None, half: bool = True) -> ModelPackage:
    """Save ``model`` (built by ``build_model``) as a package in a new folder ``folder``."""
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise PackageError(f"{folder}: exists and is not empty; a package is written into a new folder")
    if schema.num_classes != model.builder_args["num_classes"]:
        raise PackageError(f"schema {schema.name!r} has {schema.num_classes} classes but the model outputs "
                           f"{model.builder_args['num_classes']}")
    folder.mkdir(parents=True, exist_ok=True)
    state = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu().contiguous()
        is_stat = k.endswith(("running_mean", "running_var"))
        state[k] = v.half() if (half and v.is_floating_point() and not is_stat) else v
    wpath = folder / WEIGHTS_FILE
    save_file(state, str(wpath))
    manifest = {
        "format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, "name": name, "version": int(version),
        "architecture": dict(model.builder_args), "schema": schema.to_dict(),
        "input": input_contract or default_input_contract(),
        "training": {"code_version": code_version(),
                     "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                     **(training or {})},
        "metrics": metrics or {},
        "weights": {"file": WEIGHTS_FILE, "sha256": sha256_file(wpath), "dtype": "float16" if half else "float32",
                    "parameters": int(sum(p.numel() for p in model.parameters()))},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return read_package(folder)


# --------------------------------------------------------------------------------------
class Registry:
    """A folder of model packages ``<root>/<name>/<version>/`` plus ``index.json``."""

    def __init__(self, root: str | os.PathLike, *, read_only: bool = False):
        self.root = Path(root)
        self.read_only = read_only

    # --- index ---------------------------------------------------------------------
    @property
    def index_path(self) -> Path:
        return self.root / "index.json"

    def index(self) -> dict:
        if not self.index_path.exists():
            return {"format": REGISTRY_FORMAT, "format_version": 1, "default": None, "ensemble": [], "models": {}}
        fix = (f"repair it, or move it aside to start an empty index (the model folders in {self.root} "
               f"are kept and can be published again)")
        try:
            data = json.loads(self.index_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PackageError(f"{self.index_path}: registry index is unreadable ({exc}); {fix}") from None
        if not isinstance(data, dict) or data.get("format") != REGISTRY_FORMAT:
            raise PackageError(f"{self.index_path}: not a LumbarSegment registry index; {fix}")
        try:
            version = int(data.get("format_version", 1))
        except (TypeError, ValueError):
            raise PackageError(f"{self.index_path}: malformed format_version; {fix}") from None
        if version > REGISTRY_FORMAT_VERSION:
            raise PackageError(f"{self.index_path}: registry format version {version} is newer than this "
                               f"LumbarSegment supports ({REGISTRY_FORMAT_VERSION}); update LumbarSegment")
        if not isinstance(data.get("models", {}), dict):
            raise PackageError(f"{self.index_path}: 'models' must be an object; {fix}")
        return data

    def _write_index(self, data: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".index.", suffix=".json", dir=self.root)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, self.index_path)

    # --- queries -----------------------------------------------------------------
    def packages(self) -> list[ModelPackage]:
        idx = self.index()
        out = []
        for name, entry in sorted(idx.get("models", {}).items()):
            for v in entry.get("versions", []):
                p = self.root / name / str(v)
                if p.is_dir():
                    out.append(read_package(p))
        return out

    def default_ref(self) -> str | None:
        return self.index().get("default")

    def ensemble_refs(self) -> list[str]:
        return list(self.index().get("ensemble", []))

    def get(self, ref: str) -> ModelPackage:
        """``name`` (its newest version… or the default version) or ``name@version``."""
        idx = self.index()
        name, _, ver = ref.partition("@")
        entry = idx.get("models", {}).get(name)
        if entry is None:
            raise PackageError(f"no model {name!r} in registry {self.root} (it has: "
                               f"{', '.join(sorted(idx.get('models', {}))) or 'none'})")
        if not ver:
            d = idx.get("default") or ""
            ver = d.partition("@")[2] if d.partition("@")[0] == name else str(max(entry["versions"]))
        if int(ver) not in [int(v) for v in entry["versions"]]:
            raise PackageError(f"model {name!r} has no version {ver} (versions: {entry['versions']})")
        return read_package(self.root / name / str(int(ver)))

    def next_version(self, name: str) -> int:
        versions = self.index().get("models", {}).get(name, {}).get("versions", [])
        on_disk = [int(p.name) for p in (self.root / name).glob("*") if p.name.isdigit()] \
            if (self.root / name).is_dir() else []
        return max(versions + on_disk, default=0) + 1

    # --- publishing --------------------------------------------------------------
    def publish(self, package: ModelPackage, *, make_default: bool = False,
                ensemble: list[str] | None = None) -> ModelPackage:
        """Copy ``package`` in as the next version of its name; atomic (see module doc)."""
        if self.read_only:
            raise PackageError(f"registry {self.root} is read-only (shipped models); publish to the user registry")
        package.verify()
        self.root.mkdir(parents=True, exist_ok=True)
        version = self.next_version(package.name)
        final = self.root / package.name / str(version)
        self._remove_abandoned_publishes()
        tmp = Path(tempfile.mkdtemp(prefix=f".publish+{os.getpid()}+{socket.gethostname()}+{package.name}+",
                                    dir=self.root))
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700: a shared registry must stay readable
        try:
            shutil.copy2(package.path / package.manifest["weights"]["file"], tmp / WEIGHTS_FILE)
            manifest = json.loads(json.dumps(package.manifest))
            manifest["version"] = version
            manifest["weights"]["file"] = WEIGHTS_FILE
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
            read_package(tmp).verify()
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        idx = self.index()
        entry = idx.setdefault("models", {}).setdefault(package.name, {"versions": []})
        entry["versions"] = sorted(set(int(v) for v in entry["versions"]) | {version})
        ref = f"{package.name}@{version}"
        if make_default or not idx.get("default"):
            idx["default"] = ref
        if ensemble is not None:
            idx["ensemble"] = list(ensemble)
        self._write_index(idx)
        return read_package(final)

    def _remove_abandoned_publishes(self) -> None:
        """Delete the temporary folders of publishes whose process is gone (killed mid-copy; same host only)."""
        for old in self.root.glob(".publish+*"):
            parts = old.name.split("+")
            if (len(parts) > 3 and parts[1].isdigit() and parts[2] == socket.gethostname()
                    and not pid_alive(int(parts[1]))):
                shutil.rmtree(old, ignore_errors=True)

    def set_default(self, ref: str) -> None:
        self.get(ref)
        idx = self.index()
        idx["default"] = ref if "@" in ref else self.get(ref).ref
        self._write_index(idx)


def user_registry_root() -> Path:
    return Path(os.environ.get("LUMBARSEG_HOME", Path.home() / ".lumbarsegment")) / "models"


def default_registries() -> list[Registry]:
    """The user's registry (retrained models) first, then the read-only shipped one."""
    return [Registry(user_registry_root()), Registry(shipped_registry_root(), read_only=True)]


def resolve_model(ref: str | None, registries: list[Registry] | None = None) -> ModelPackage:
    """A model package from a folder path, ``name[@version]``, or ``None`` for the default."""
    if ref and (os.sep in ref or ref.startswith(".") or Path(ref).is_dir()):
        return read_package(ref)
    registries = default_registries() if registries is None else registries
    errors = []
    for reg in registries:
        reg.index()  # a damaged index is an error to fix, not a reason to fall back on another registry
        try:
            r = ref or reg.default_ref()
            if r:
                return reg.get(r)
        except PackageError as exc:
            errors.append(str(exc))
    what = f"model {ref!r}" if ref else "a default model"
    raise PackageError(f"cannot find {what} in registries {[str(r.root) for r in registries]}"
                       + (f": {'; '.join(errors)}" if errors else ""))


def resolve_ensemble(registries: list[Registry] | None = None) -> list[ModelPackage]:
    registries = default_registries() if registries is None else registries
    for reg in registries:
        refs = reg.ensemble_refs() if reg.index_path.exists() else []
        if refs:
            return [reg.get(r) for r in refs]
    raise PackageError("no default ensemble is configured; name the models with --model A,B")


@contextlib.contextmanager
def temporary_package_dir():
    d = Path(tempfile.mkdtemp(prefix="lumbarseg-pkg-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
