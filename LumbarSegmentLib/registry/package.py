"""A model package: one folder holding a trained model that can be checked before it is loaded.

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
               "patch_size": [256, 256], "channels": 1 (2.5D: 2k+1, "slice_context": k on each side)},
     "training": {"data_manifest_sha256", "epochs", "folds", "date", "code_version", ...},
     "metrics": {...validation metrics...},
     "weights": {"file": "weights.safetensors", "sha256": "...", "dtype": "float16"}}

Loading verifies the sha256 of the weights before reading a byte of them as tensors
and refuses a mismatch, a pickle, or a manifest from a newer format. Where packages are
kept and how a name becomes one package: ``registry.py`` and ``catalog.py``.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass
from pathlib import Path

from LumbarSegmentLib.core.files import normal_file_mode, sha256_file, shipped_folder
from LumbarSegmentLib.core.schema import LabelSchema
from LumbarSegmentLib.registry.manifest import ManifestError, check_integrity, refuse_pickle, seal, validate_manifest, validate_name

MODEL_FORMAT = "lumbarsegment.model"
MODEL_FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.safetensors"


class PackageError(ValueError):
    """A model package or registry is missing, malformed, tampered with or unsafe."""


def shipped_registry_root() -> Path:
    """The read-only registry of models that ship with LumbarSegment (the one place to look it up).

    A wheel carries it as the data-only package ``LumbarSegmentLib/shipped_models`` (pyproject maps
    ``Resources/Models`` there); a source checkout and the installed Slicer extension keep it in
    ``Resources/Models`` beside ``LumbarSegmentLib/``. The in-package copy wins when it has an index,
    so an unrelated ``Resources/`` folder next to an installed package is never mistaken for it.
    """
    return shipped_folder("shipped_models", "Models", marker="index.json")


def code_version() -> str:
    from LumbarSegmentLib import __version__

    return __version__


def default_input_contract(spacing_mm=(1.0, 1.0), patch=(256, 256), slice_context: int = 0) -> dict:
    return {"modality": "MR", "sequences": ["T1w", "T2w"], "plane": "sagittal", "channels": 2 * int(slice_context) + 1,
            "spacing_mm": [float(s) for s in spacing_mm], "normalisation": {"method": "zscore_nonzero"},
            "patch_size": [int(p) for p in patch], **({"slice_context": int(slice_context)} if slice_context else {})}


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
    def parent(self) -> dict | None:
        """``{"ref", "sha256"}`` of the package this one was fine-tuned from, ``None`` if trained from scratch."""
        return self.manifest.get("parent")

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
        try:
            refuse_pickle(wfile)
        except ManifestError as exc:
            raise PackageError(str(exc)) from None
        actual = sha256_file(wfile)
        if actual != self.sha256:
            raise PackageError(
                f"{self.path}: weights checksum mismatch (manifest says {self.sha256[:12]}…, file is "
                f"{actual[:12]}…). The file was changed or damaged; reinstall or re-publish this model."
            )
        try:  # the manifest's meaning (classes, architecture, input) must be what was sealed with the weights
            check_integrity(self.manifest, f"{self.path}/manifest.json", legacy_ok=is_shipped(self.path))
        except ManifestError as exc:
            raise PackageError(str(exc)) from None

    def load_model(self, device="cpu"):
        """Verify the weights, build the architecture and load them (float32, eval mode)."""
        import torch
        from safetensors.torch import load_file

        from LumbarSegmentLib.models.checked import ArchitectureError, build_checked, safetensors_shapes

        self.verify()
        wfile = self.path / self.manifest["weights"]["file"]
        try:
            shapes, state = safetensors_shapes(wfile), load_file(str(wfile))
        except Exception as exc:  # safetensors raises its own error types
            raise PackageError(f"{self.path}: cannot read weights as safetensors: {exc}") from None
        try:  # unknown keys and shapes checked on the meta device, before a real network is built
            model = build_checked(self.manifest["architecture"], f"model {self.ref} ({self.path})", shapes)
        except ArchitectureError as exc:
            raise PackageError(str(exc)) from None
        state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
        model.load_state_dict(state, strict=True)  # names and shapes were checked above
        return model.to(device=torch.device(device)).eval()


def is_shipped(path: str | os.PathLike) -> bool:
    """Packages of the shipped registry predate the integrity record; they are part of the installation."""
    root = os.path.realpath(shipped_registry_root())
    return os.path.realpath(path).startswith(root + os.sep)


def read_package(path: str | os.PathLike) -> ModelPackage:
    path = Path(path)
    mpath = path / "manifest.json"
    if not mpath.is_file():
        raise PackageError(f"{path}: not a model package (no manifest.json)")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackageError(f"{mpath}: cannot read manifest: {exc}") from None
    try:  # every field's type first: a wrong one is a message, never a traceback further on
        validate_manifest(manifest, str(mpath), newest_format=MODEL_FORMAT_VERSION, model_format=MODEL_FORMAT)
    except ManifestError as exc:
        raise PackageError(str(exc)) from None
    wname = manifest["weights"].get("file", "")
    if Path(wname).name != wname or not wname.endswith(".safetensors"):
        raise PackageError(f"{mpath}: weights must be a .safetensors file inside the package, got {wname!r}")
    if manifest["input"].get("plane", "sagittal") != "sagittal":
        raise PackageError(f"{mpath}: only sagittal models are supported")
    pkg = ModelPackage(path=path, manifest=manifest)
    pkg.schema  # validates the schema
    return pkg


@dataclass(frozen=True)
class PackageInfo:
    """What a new package's manifest says besides its weights.

    ``parent`` (``{"ref", "sha256"}``) names the package a fine-tune started from; when not
    given it is taken from ``training["init_from"]`` (what the trainer records for a
    fine-tune), so every fine-tuned package says where its weights came from.
    """

    name: str
    schema: LabelSchema
    version: int = 1
    input_contract: dict | None = None
    training: dict | None = None
    metrics: dict | None = None
    parent: dict | None = None


def write_package(folder: str | os.PathLike, model, info: PackageInfo | None = None, *, half: bool = True,
                  **fields) -> ModelPackage:
    """Save ``model`` (built by ``build_model``) as a package in a new folder ``folder``.

    What the manifest says is ``info``, or the fields of :class:`PackageInfo` given by keyword
    (``write_package(folder, model, name=..., schema=...)``). ``half`` stores the weights as
    float16 (batch-norm statistics stay float32).
    """
    from safetensors.torch import save_file

    info = info if info is not None else PackageInfo(**fields)
    folder, name = Path(folder), validate_name(info.name, f"{folder}")  # before a byte is written
    if folder.exists() and any(folder.iterdir()):
        raise PackageError(f"{folder}: exists and is not empty; a package is written into a new folder")
    schema = info.schema
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
        "format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, "name": name, "version": int(info.version),
        "architecture": dict(model.builder_args), "schema": schema.to_dict(),
        "input": info.input_contract or default_input_contract(),
        "training": {"code_version": code_version(),
                     "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                     **(info.training or {})},
        "metrics": info.metrics or {},
        **({"parent": parent} if (parent := info.parent or _parent_from(info.training)) else {}),
        "weights": {"file": WEIGHTS_FILE, "sha256": sha256_file(wpath), "dtype": "float16" if half else "float32",
                    "parameters": int(sum(p.numel() for p in model.parameters()))},
    }
    os.chmod(wpath, normal_file_mode())
    (folder / "manifest.json").write_text(json.dumps(seal(manifest), indent=1))
    return read_package(folder)


def _parent_from(training: dict | None) -> dict | None:
    init = (training or {}).get("init_from") or {}
    if not isinstance(init, dict) or not init.get("package"):
        return None
    return {"ref": str(init["package"]), "sha256": init.get("weights_sha256")}
