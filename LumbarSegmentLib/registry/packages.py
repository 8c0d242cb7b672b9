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
               "patch_size": [256, 256], "channels": 1 (2.5D: 2k+1, "slice_context": k on each side)},
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

from LumbarSegmentLib.core.files import atomic_path, locked, normal_file_mode, pid_alive, sha256_file, umask  # sha256_file: re-export
from LumbarSegmentLib.registry.manifest import ManifestError, check_integrity, seal, validate_index, validate_manifest, validate_name
from LumbarSegmentLib.registry.manifest import refuse_pickle as _refuse_pickle  # the old private name stays importable
from LumbarSegmentLib.core.schema import LabelSchema

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
    here = Path(__file__).resolve().parent.parent  # LumbarSegmentLib/
    packaged = here / "shipped_models"
    if (packaged / "index.json").is_file():
        return packaged
    return here.parent / "Resources" / "Models"


class PackageError(ValueError):
    """A model package or registry is missing, malformed, tampered with or unsafe."""


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
            _refuse_pickle(wfile)
        except ManifestError as exc:
            raise PackageError(str(exc)) from None
        actual = sha256_file(wfile)
        if actual != self.sha256:
            raise PackageError(
                f"{self.path}: weights checksum mismatch (manifest says {self.sha256[:12]}…, file is "
                f"{actual[:12]}…). The file was changed or damaged; reinstall or re-publish this model."
            )
        try:  # the manifest's meaning (classes, architecture, input) must be what was sealed with the weights
            check_integrity(self.manifest, f"{self.path}/manifest.json", legacy_ok=_is_shipped(self.path))
        except ManifestError as exc:
            raise PackageError(str(exc)) from None

    def load_model(self, device="cpu"):
        """Verify the weights, build the architecture and load them (float32, eval mode)."""
        import torch
        from safetensors.torch import load_file

        from LumbarSegmentLib.models import build_model

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


def _is_shipped(path: Path) -> bool:
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
                  metrics: dict | None = None, half: bool = True, parent: dict | None = None) -> ModelPackage:
    """Save ``model`` (built by ``build_model``) as a package in a new folder ``folder``.

    ``parent`` (``{"ref", "sha256"}``) names the package a fine-tune started from; when not
    given it is taken from ``training["init_from"]`` (what the trainer records for a
    fine-tune), so every fine-tuned package says where its weights came from.
    """
    import torch
    from safetensors.torch import save_file

    folder, name = Path(folder), validate_name(name, f"{folder}")  # before a byte is written
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
        **({"parent": parent} if (parent := parent or _parent_from(training)) else {}),
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
        try:  # names become folder names: each must stay one plain folder inside the registry
            validate_index(data, str(self.index_path), fix)
        except ManifestError as exc:
            raise PackageError(str(exc)) from None
        return data

    def _write_index(self, data: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.index_path) as tmp, open(tmp, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())

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
                ensemble: list[str] | None = None, catalog: "Catalog | None" = None,
                name: str | None = None, record: dict | None = None) -> ModelPackage:
        """Copy ``package`` in as the next version of its name (or of ``name``); atomic (see module doc).

        ``record`` (the publish gate's verdict, e.g. ``own_source_only``) is kept as the published
        manifest's ``publish`` field, outside the seal like the name.

        ``name`` publishes a run's package as a version of an existing model line (a fine-tune of
        ``uvd-starter`` trained under a working name becomes ``uvd-starter@2``); the name is not
        part of the manifest's seal, so the package stays intact.

        The version comes after the highest version of that name in *every* registry of
        ``catalog`` (by default :meth:`catalog`: the user's and the shipped registries when
        this is one of them), so a fine-tune of ``uvd-starter@1`` published into the user
        registry becomes ``uvd-starter@2`` and never a second ``uvd-starter@1``. It becomes
        the default only when asked, or when no registry of the catalogue has a default.
        """
        if self.read_only:
            raise PackageError(f"registry {self.root} is read-only (shipped models); publish to the user registry")
        package.verify()
        catalog = catalog or self.catalog()
        self.root.mkdir(parents=True, exist_ok=True)
        with locked(self.root):  # concurrent publishes: one read-modify-write at a time
            return self._publish_locked(package, make_default, ensemble, catalog,
                                        validate_name(name, "model name") if name else package.name, record)

    def _publish_locked(self, package: ModelPackage, make_default: bool, ensemble, catalog, name: str,
                        record: dict | None = None) -> ModelPackage:
        version = max(self.next_version(name), catalog.next_version(name))
        final = self.root / name / str(version)
        self._remove_abandoned_publishes()
        tmp = Path(tempfile.mkdtemp(prefix=f".publish+{os.getpid()}+{socket.gethostname()}+{name}+",
                                    dir=self.root))
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700: a shared registry must stay readable
        try:
            shutil.copy2(package.path / package.manifest["weights"]["file"], tmp / WEIGHTS_FILE)
            os.chmod(tmp / WEIGHTS_FILE, normal_file_mode())  # copy2 copies the source's (maybe private) mode
            manifest = json.loads(json.dumps(package.manifest))
            manifest["name"], manifest["version"] = name, version
            manifest["weights"]["file"] = WEIGHTS_FILE
            if record is not None:
                manifest["publish"] = record
            (tmp / "manifest.json").write_text(json.dumps(seal(manifest), indent=1))  # verified above
            read_package(tmp).verify()
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        idx = self.index()
        entry = idx.setdefault("models", {}).setdefault(name, {"versions": []})
        entry["versions"] = sorted(set(int(v) for v in entry["versions"]) | {version})
        ref = f"{name}@{version}"
        if make_default or not (idx.get("default") or catalog.default_ref(skip_broken=True)):
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

    def catalog(self) -> "Catalog":
        """The registries this one is used with: the default ones (with this object in its place) when
        its folder is the user's or the shipped registry, else this registry alone."""
        mine = _same_folder(self.root)
        regs = default_registries()
        if not any(_same_folder(r.root) == mine for r in regs):
            return Catalog([self])
        return Catalog([self if _same_folder(r.root) == mine else r for r in regs])

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


def _same_folder(path) -> str:
    return os.path.normcase(os.path.realpath(path))


def registry_source(registry: Registry) -> str:
    """Where a registry's models come from, in words: ``shipped``, ``user`` or its folder."""
    folder = _same_folder(registry.root)
    if folder == _same_folder(shipped_registry_root()):
        return "shipped"
    if folder == _same_folder(user_registry_root()):
        return "user"
    return "read-only " + str(registry.root) if registry.read_only else str(registry.root)


@dataclass
class CatalogEntry:
    """One model of the catalogue: its package, the registry holding it, and its roles."""

    package: ModelPackage
    registry: Registry
    source: str
    default: bool = False
    ensemble: bool = False


class Catalog:
    """Several registries seen as one, so that a ref names exactly one package.

    Identity rules (docs/formats.md, "Registry"):

    * A name's versions are one sequence across the registries: publishing numbers the
      new version after the highest one anywhere (:meth:`next_version`), so the user
      registry's fine-tune of ``uvd-starter@1`` is ``uvd-starter@2``.
    * Should two registries still hold the same ref (a user registry written by an older
      LumbarSegment, or a newer release shipping a number the user already used), the
      read-only (shipped) copy keeps the ref and the other copy is set aside in
      :attr:`conflicts`, never listed or loaded under that ref: shipped refs always load
      the shipped weights.
    * The default in use is the default of the first registry (in order: user, shipped)
      that names one; there is exactly one. The default ensemble likewise.
    """

    def __init__(self, registries: list[Registry] | None = None):
        self.registries = default_registries() if registries is None else list(registries)
        self.errors: list[str] = []  # registries that could not be read (skip_broken=True)
        self.conflicts: list[CatalogEntry] = []

    def _indexes(self, skip_broken: bool):
        out = []
        for reg in self.registries:
            try:
                out.append((reg, reg.index()))
            except PackageError as exc:  # a damaged index is an error to fix, never a silent fallback
                if not skip_broken:
                    raise
                self.errors.append(str(exc))
        return out

    def _owners(self, skip_broken: bool = False) -> dict[tuple[str, int], Registry]:
        """(name, version) -> the one registry whose copy that ref names."""
        owners: dict[tuple[str, int], Registry] = {}
        for reg, idx in self._indexes(skip_broken):
            for name, entry in idx.get("models", {}).items():
                for v in entry.get("versions", []):
                    key = (name, int(v))
                    held = owners.get(key)
                    if held is None or (reg.read_only and not held.read_only):
                        owners[key] = reg
        return owners

    def next_version(self, name: str) -> int:
        return max([v for (n, v) in self._owners(skip_broken=True) if n == name]
                   + [r.next_version(name) - 1 for r in self.registries if not r.read_only], default=0) + 1

    def default_ref(self, skip_broken: bool = False) -> str | None:
        for _, idx in self._indexes(skip_broken):
            if idx.get("default"):
                return idx["default"]
        return None

    def ensemble_refs(self) -> list[str]:
        for _, idx in self._indexes(False):
            if idx.get("ensemble"):
                return list(idx["ensemble"])
        return []

    def get(self, ref: str) -> ModelPackage:
        """``name@version``, or ``name`` (the default's version if the default has that name, else the newest)."""
        owners = self._owners()
        name, _, ver = ref.partition("@")
        versions = sorted(v for (n, v) in owners if n == name)
        if not versions:
            names = sorted({n for n, _ in owners})
            raise PackageError(f"cannot find model {name!r} in registries {[str(r.root) for r in self.registries]} "
                               f"(they have: {', '.join(names) or 'none'})")
        if not ver:
            d_name, _, d_ver = (self.default_ref() or "").partition("@")
            ver = d_ver if d_name == name and d_ver else str(versions[-1])
        try:
            key = (name, int(ver))
        except ValueError:
            raise PackageError(f"{ref!r}: a version is a whole number (name@3)") from None
        if key not in owners:
            raise PackageError(f"model {name!r} has no version {ver} (versions: {versions})")
        return read_package(owners[key].root / name / str(key[1]))

    def default(self) -> ModelPackage:
        ref = self.default_ref()
        if not ref:
            raise PackageError(f"no default model in registries {[str(r.root) for r in self.registries]}")
        return self.get(ref)

    def ensemble(self) -> list[ModelPackage]:
        refs = self.ensemble_refs()
        if not refs:
            raise PackageError("no default ensemble is configured; name the models with --model A,B")
        return [self.get(r) for r in refs]

    def entries(self, *, skip_broken: bool = False) -> list[CatalogEntry]:
        """Every model once (its ref held by one registry), the default first; conflicts set aside."""
        self.conflicts = []
        owners = self._owners(skip_broken)
        default = self.default_ref(skip_broken=True)
        ensemble = set(self.ensemble_refs()) if not self.errors else set()
        rows = []
        for reg, idx in self._indexes(skip_broken=True):
            for name, entry in sorted(idx.get("models", {}).items()):
                for v in sorted(int(x) for x in entry.get("versions", [])):
                    folder = reg.root / name / str(v)
                    if not folder.is_dir():
                        continue
                    try:
                        pkg = read_package(folder)
                    except PackageError as exc:
                        if not skip_broken:
                            raise
                        self.errors.append(str(exc))
                        continue
                    row = CatalogEntry(pkg, reg, registry_source(reg), default=pkg.ref == default,
                                       ensemble=pkg.ref in ensemble)
                    if owners.get((name, v)) is reg:
                        rows.append(row)
                    else:
                        row.default = row.ensemble = False
                        self.conflicts.append(row)
        rows.sort(key=lambda r: not r.default)
        return rows


def resolve_model(ref: str | None, registries: list[Registry] | None = None) -> ModelPackage:
    """A model package from a folder path, ``name[@version]``, or ``None`` for the default in use.

    Registry refs go through :class:`Catalog`, so a ref names one package whichever
    registry holds it.
    """
    if ref and (os.sep in ref or ref.startswith(".") or Path(ref).is_dir()):
        return read_package(ref)
    catalog = Catalog(registries)
    return catalog.get(ref) if ref else catalog.default()


def resolve_ensemble(registries: list[Registry] | None = None) -> list[ModelPackage]:
    return Catalog(registries).ensemble()


@contextlib.contextmanager
def temporary_package_dir():
    d = Path(tempfile.mkdtemp(prefix="lumbarseg-pkg-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
