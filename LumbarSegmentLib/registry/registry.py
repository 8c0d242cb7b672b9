"""A registry: a folder of model packages that it lists, and into which it publishes.

A **registry** is a folder ``<root>/<name>/<version>/`` of packages plus ``index.json``
naming the versions it holds, the default model and the default ensemble. Publishing copies
into a temporary folder, verifies it, renames it into place, and only then rewrites the
index (itself written to a temporary file and renamed): a crash at any point leaves the
index pointing at whole packages only.

A registry never turns a name into a version: which version a new package gets, and which
package a ref names, is the catalogue's decision (``catalog.Catalog``), made over every
registry in use (the user's and the shipped one). :meth:`Registry.publish` asks the catalogue
it is given for the version and writes it.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Protocol

from LumbarSegmentLib.core.files import host_tag, atomic_path, locked, normal_file_mode, pid_alive, umask
from LumbarSegmentLib.registry.manifest import INTEGRITY_SCHEME, ManifestError, registry_write_error, seal, validate_index, validate_name
from LumbarSegmentLib.registry.package import WEIGHTS_FILE, ModelPackage, PackageError, read_package, shipped_registry_root

REGISTRY_FORMAT = "lumbarsegment.registry"
REGISTRY_FORMAT_VERSION = 1


class Numbering(Protocol):
    """What publishing asks of the catalogue a registry is used with (``catalog.Catalog``)."""

    def version_for(self, name: str, registry: "Registry") -> int: ...

    def check_ensemble(self, refs: list[str], new_ref: str) -> None: ...

    def default_ref(self, skip_broken: bool = False) -> str | None: ...


class Registry:
    """A folder of model packages ``<root>/<name>/<version>/`` plus ``index.json``."""

    def __init__(self, root: str | os.PathLike, *, read_only: bool = False):
        self.root = Path(root)
        self.read_only = read_only

    # --- what it holds -------------------------------------------------------------
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

    def next_version(self, name: str) -> int:
        """One more than the highest version of ``name`` this folder holds (indexed or left on disk)."""
        versions = self.index().get("models", {}).get(name, {}).get("versions", [])
        on_disk = [int(p.name) for p in (self.root / name).glob("*") if p.name.isdigit()] \
            if (self.root / name).is_dir() else []
        return max(versions + on_disk, default=0) + 1

    # --- publishing --------------------------------------------------------------
    def publish(self, package: ModelPackage, *, catalog: Numbering, make_default: bool = False,
                ensemble: list[str] | None = None, name: str | None = None,
                record: dict | None = None) -> ModelPackage:
        """Copy ``package`` in as the next version of its name (or of ``name``); atomic (see module doc).

        ``record`` (the publish gate's verdict, e.g. ``own_source_only``) is kept as the published
        manifest's ``publish`` field, outside the seal like the name.

        ``name`` publishes a run's package as a version of an existing model line (a fine-tune of
        ``uvd-starter`` trained under a working name becomes ``uvd-starter@2``); the name is not
        part of the manifest's seal, so the package stays intact.

        ``catalog`` (``catalog.Catalog``, usually ``Catalog.around(registry)``: the user's and the
        shipped registries when this is one of them) chooses the version: after the highest
        version of that name in *every* one of its registries, so a fine-tune of ``uvd-starter@1``
        published into the user registry becomes ``uvd-starter@2`` and never a second
        ``uvd-starter@1``. It becomes the default only when asked, or when no registry of the
        catalogue has a default.
        """
        if self.read_only:
            raise PackageError(f"registry {self.root} is read-only (shipped models); publish to the user registry")
        package.verify()
        name = validate_name(name, "model name") if name else package.name
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with locked(self.root):  # concurrent publishes: one read-modify-write at a time
                version = catalog.version_for(name, self)
                if ensemble is not None:  # validated before a byte is written
                    catalog.check_ensemble(ensemble, f"{name}@{version}")
                final = self._copy_in(package, name, version, record)
                idx = self.index()
                entry = idx.setdefault("models", {}).setdefault(name, {"versions": []})
                entry["versions"] = sorted(set(int(v) for v in entry["versions"]) | {version})
                if make_default or not (idx.get("default") or catalog.default_ref(skip_broken=True)):
                    idx["default"] = f"{name}@{version}"
                if ensemble is not None:
                    idx["ensemble"] = list(ensemble)
                self._write_index(idx)
                return read_package(final)
        except OSError as exc:
            raise PackageError(registry_write_error(self.root, exc)) from None

    def set_refine(self, ref: str) -> None:
        """Make ``ref`` (a model of this registry) the one click correction uses when none is named."""
        if self.read_only:
            raise PackageError(f"registry {self.root} is read-only (shipped models); publish to the user registry")
        name, _, ver = ref.partition("@")
        try:
            with locked(self.root):
                idx = self.index()
                if int(ver or 0) not in idx.get("models", {}).get(name, {}).get("versions", []):
                    raise PackageError(f"registry {self.root} holds no {ref}; publish it first")
                idx["refine"] = ref
                self._write_index(idx)
        except OSError as exc:
            raise PackageError(registry_write_error(self.root, exc)) from None

    def _copy_in(self, package: ModelPackage, name: str, version: int, record: dict | None = None) -> Path:
        """Copy the package to ``<root>/<name>/<version>`` through a verified temporary folder."""
        final = self.root / name / str(version)
        self._remove_abandoned_publishes()
        tmp = Path(tempfile.mkdtemp(prefix=f".publish+{os.getpid()}+{host_tag()}+{name}+", dir=self.root))
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700: a shared registry must stay readable
        try:
            shutil.copy2(package.path / package.manifest["weights"]["file"], tmp / WEIGHTS_FILE)
            os.chmod(tmp / WEIGHTS_FILE, normal_file_mode())  # copy2 copies the source's (maybe private) mode
            manifest = json.loads(json.dumps(package.manifest))
            manifest["name"], manifest["version"] = name, version
            manifest["weights"]["file"] = WEIGHTS_FILE
            if record is not None:
                manifest["publish"] = record
            scheme = (package.manifest.get("integrity") or {}).get("scheme", INTEGRITY_SCHEME)
            (tmp / "manifest.json").write_text(json.dumps(seal(manifest, scheme), indent=1))  # verified above
            read_package(tmp).verify()
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def _write_index(self, data: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.index_path) as tmp, open(tmp, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())

    def _remove_abandoned_publishes(self) -> None:
        """Delete the temporary folders of publishes whose process is gone (killed mid-copy; same host only)."""
        for old in self.root.glob(".publish+*"):
            parts = old.name.split("+")
            if (len(parts) > 3 and parts[1].isdigit() and parts[2] == host_tag()
                    and not pid_alive(int(parts[1]))):
                shutil.rmtree(old, ignore_errors=True)


def user_registry_root() -> Path:
    return Path(os.environ.get("LUMBARSEG_HOME", Path.home() / ".lumbarsegment")) / "models"


def default_registries() -> list[Registry]:
    """The user's registry (retrained models) first, then the read-only shipped one."""
    return [Registry(user_registry_root()), Registry(shipped_registry_root(), read_only=True)]


def same_folder(path) -> str:
    """A folder's identity for comparison (links resolved, case folded where the system does)."""
    return os.path.normcase(os.path.realpath(path))


def registry_source(registry: Registry) -> str:
    """Where a registry's models come from, in words: ``shipped``, ``user`` or its folder."""
    folder = same_folder(registry.root)
    if folder == same_folder(shipped_registry_root()):
        return "shipped"
    if folder == same_folder(user_registry_root()):
        return "user"
    return "read-only " + str(registry.root) if registry.read_only else str(registry.root)
