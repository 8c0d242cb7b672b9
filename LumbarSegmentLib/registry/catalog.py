"""The catalogue: every registry in use seen as one, the one place a name becomes a version.

Whatever names a model (``--model uvd-starter``, ``name@3``, the default, the default ensemble,
the version a new package is published as) is resolved here, by :class:`Catalog` or
:func:`resolve_model` (which also takes a package folder). Registries only hold packages
(``registry.py``); this module chooses among them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from LumbarSegmentLib.registry.manifest import ManifestError, check_ensemble_refs
from LumbarSegmentLib.registry.package import ModelPackage, PackageError, read_package
from LumbarSegmentLib.registry.registry import Registry, default_registries, registry_source, same_folder


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

    @classmethod
    def around(cls, registry: Registry, registries: list[Registry] | None = None) -> "Catalog":
        """The catalogue ``registry`` is used with: ``registries`` (by default the user's and the shipped
        ones) with ``registry`` itself in place of the one in the same folder. With the default
        registries, a registry that is neither of them is its own catalogue."""
        mine = same_folder(registry.root)
        regs = default_registries() if registries is None else list(registries)
        if registries is None and not any(same_folder(r.root) == mine for r in regs):
            return cls([registry])
        return cls([registry if same_folder(r.root) == mine else r for r in regs])

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

    def version_for(self, name: str, registry: Registry) -> int:
        """The version a new package of ``name`` published into ``registry`` gets: after every version
        of that name in this catalogue and in ``registry`` (which need not be one of its registries)."""
        return max(registry.next_version(name), self.next_version(name))

    def check_ensemble(self, refs: list[str], new_ref: str) -> None:
        """Refuse an ensemble naming a ref this catalogue does not hold (``new_ref``: the one being published)."""
        try:
            check_ensemble_refs(refs, self._owners(skip_broken=True), new_ref)
        except ManifestError as exc:
            raise PackageError(str(exc)) from None

    def default_ref(self, skip_broken: bool = False) -> str | None:
        for _, idx in self._indexes(skip_broken):
            if idx.get("default"):
                return idx["default"]
        return None

    def refine_ref(self) -> str | None:
        """The model click correction uses when none is named (the index's ``refine``, a click-guided model),
        from the first registry that names one."""
        for _, idx in self._indexes(True):
            if idx.get("refine"):
                return idx["refine"]
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


def resolve_refine_model(ref: str | None, registries: list[Registry] | None = None) -> ModelPackage:
    """The model that corrects drafts with clicks: ``ref`` when given, else the catalogue's click-guided
    model (its ``refine`` role), else the default model (which then corrects with the training-free rules)."""
    if ref:
        return resolve_model(ref, registries)
    catalog = Catalog(registries)
    refine = catalog.refine_ref()
    return catalog.get(refine) if refine else catalog.default()


def corrector_for(package: ModelPackage, registries: list[Registry] | None = None) -> ModelPackage:
    """The model that corrects ``package``'s drafts with clicks in the front ends: the catalogue's click-guided
    model when it labels the same structures with the same values as ``package`` (it then reads and edits
    those drafts as its own), else ``package`` itself (the training-free rules)."""
    if "guidance" in package.manifest.get("input", {}):
        return package
    catalog = Catalog(registries)
    ref = catalog.refine_ref()
    if not ref:
        return package
    try:
        guide = catalog.get(ref)
    except PackageError:
        return package
    mine = {c.id: c.value for c in package.schema.classes}
    fits = all(mine.get(c.id) == c.value for c in guide.schema.classes)
    return guide if fits else package


def resolve_ensemble(registries: list[Registry] | None = None) -> list[ModelPackage]:
    return Catalog(registries).ensemble()
