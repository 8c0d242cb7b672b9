"""Which patients a model has seen: its own training cases and those of every model it was fine-tuned from.

A score only means something on patients the model never trained on. Two places ask: the publish gate
(a candidate must not be graded on its own training patients) and the validation report (a test case
whose patient trained the model, or its parent, is refused). Both ask :func:`trained_patients`, so a
fine-tune cannot pass one check and fail the other: a child inherits what its parent saw.

A patient is known three ways, and any of them counts: the case id itself, the ``patient`` the
training run recorded in its data manifest, and the caller's patient map (``cases.read_patient_map``)
for data sets whose case files name no patient.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from LumbarSegmentLib.registry.catalog import Catalog, resolve_model
from LumbarSegmentLib.registry.package import PackageError

MAX_ANCESTORS = 50  # a parent chain longer than this is a loop in the manifests, not a history


@dataclass(frozen=True)
class Lineage:
    """What a package and its ancestors trained on.

    ``cases``: training case ids; ``by_patient``: patient (or case id) -> the training case ids behind
    it; ``missing``: ancestors that could not be found, whose training cases are therefore unknown."""

    cases: frozenset
    by_patient: Mapping[str, tuple]
    missing: tuple = ()
    patient_of: Mapping[str, str] | None = None

    def via(self, case) -> list[str]:
        """The training cases that make ``case`` (a ``cases.Case``) seen: its own id, or its patient's."""
        patient = (self.patient_of or {}).get(case.case_id, case.patient)
        return sorted(set(self.by_patient.get(case.case_id, ())) | set(self.by_patient.get(patient, ())))

    def saw(self, case) -> bool:
        return bool(self.via(case))


def _registries(catalog):
    if not catalog:  # None or an empty list: the default registries
        return None
    return list(catalog.registries) if isinstance(catalog, Catalog) else list(catalog)


def _ancestors(package, registries) -> tuple[list, list[str]]:
    """The package and each parent found by following ``parent`` refs, and the refs that led nowhere.

    A parent is taken only when its ref resolves to the weights the child recorded: a run folder's
    package is often named like a published model, and a child of that folder must not inherit the
    training cases of an unrelated published model of the same name."""
    chain, missing, cur = [], [], package
    while cur is not None and len(chain) < MAX_ANCESTORS:
        chain.append(cur)
        parent = cur.manifest.get("parent") or {}
        ref, sha = parent.get("ref"), parent.get("sha256")
        cur = None
        if not ref:
            break
        try:
            cur = resolve_model(ref, registries)
        except PackageError:  # an ancestor never published (a run folder): say so and stop there
            missing.append(ref)
            break
        if sha and cur.sha256 != sha:
            missing.append(f"{ref} (an unpublished model of that name; {ref} in the registry has other weights)")
            cur = None
    return chain, missing


def trained_patients(package, catalog: Catalog | Sequence | None = None,
                     patient_of: Mapping[str, str] | None = None) -> Lineage:
    """The patients ``package`` and its ancestors trained on (``catalog``: a :class:`Catalog` or a list of
    registries to resolve ``parent`` refs in; default: the user's and the shipped ones)."""
    patient_of = dict(patient_of or {})
    chain, missing = _ancestors(package, _registries(catalog))
    cases: set[str] = set()
    by_patient: dict[str, set[str]] = {}
    for pkg in chain:
        training = pkg.manifest.get("training") or {}
        trained = set(training.get("train_cases") or [])
        recorded = {e.get("case"): e.get("patient") for e in training.get("data_manifest") or []
                    if isinstance(e, dict) and e.get("case") in trained and e.get("patient")}
        for t in trained:
            for key in {t, recorded.get(t), patient_of.get(t)} - {None, ""}:
                by_patient.setdefault(key, set()).add(t)
        cases |= trained
    return Lineage(frozenset(cases), {k: tuple(sorted(v)) for k, v in by_patient.items()}, tuple(missing),
                   patient_of)
