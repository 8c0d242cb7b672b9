"""Publish a package into a registry; it becomes the default only if it is at least as good
as the model **in use**, on cases it never trained on.

The model in use is the catalogue's default (``registry.catalog.Catalog``: the user registry's
default if it names one, else the shipped one), whichever registry holds it, not the
default of the registry being published into. Both models are run through
``evaluate.evaluate_packages`` (the engine's prediction path) on held-out cases: the
dataset's frozen validation split (``LumbarSegmentLib.dataset.holdout``) unless ``--cases`` names
others. Cases the candidate's manifest lists among its training cases are dropped. The
result is a per-class table (Dice of each, and the difference) plus the mean over the
foreground classes both schemas have, and the level-range Dice of each source of the held-out
cases; the candidate becomes the default if its mean is >= the current one's and it loses no
more than ``DEFAULT_MAX_SOURCE_DROP`` on any source and class (a fine-tune that gains on the
new cases' source while forgetting another is refused). Both are also run on the shipped reference set
(``training.reference``: a few slices of every source the shipped models were validated on), and a
candidate that loses more than ``DEFAULT_MAX_REFERENCE_DROP`` on any of its sources is refused unless the
team says only its own source matters (``own_source_only``, kept in the published manifest). With fewer than ``holdout.MIN_HOLDOUT_CASES`` held-out cases the
gate says so and does not promote unless ``--force``. Without a dataset, the metrics
recorded in the two manifests are compared only if they were computed on the same
validation cases (same ids and file checksums). Earlier versions are never removed.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from LumbarSegmentLib.dataset.cases import Case
from LumbarSegmentLib.dataset.dataset import Dataset
from LumbarSegmentLib.dataset.holdout import MIN_HOLDOUT_CASES
from LumbarSegmentLib.registry.manifest import check_ensemble_refs, provenance_problem, validate_name
from LumbarSegmentLib.registry.package import ModelPackage, PackageError, is_shipped as _is_shipped, read_package
from LumbarSegmentLib.registry.registry import Registry, user_registry_root
from LumbarSegmentLib.registry.catalog import Catalog
from LumbarSegmentLib.registry.lineage import trained_patients

from .metrics import clean
from .reference import DEFAULT_MAX_REFERENCE_DROP

log = logging.getLogger("lumbarseg.train")

#: the gate refuses a candidate that loses more than this (level-range Dice) on any source and class
#: of the held-out cases, even when its mean is better (``--max-source-drop``; negative = off)
DEFAULT_MAX_SOURCE_DROP = 0.02


@dataclass(frozen=True)
class GatePolicy:
    """How the gate judges a candidate against the model in use.

    ``metric``: what is compared on the held-out cases; ``max_drop``: the most level-range Dice the
    candidate may lose on any source and class of those cases (None = not checked);
    ``reference_drop``: the same on the reference set; ``min_cases``: held-out cases needed to
    replace the model in use; ``force``: promote whatever the numbers say (they are still recorded);
    ``never_default``: publish without making it the default; ``own_source_only``: a loss on the
    reference set is accepted (recorded in the manifest); ``device`` and ``precision`` run both models.
    """
    metric: str = "mean_dice_fg"
    max_drop: float | None = DEFAULT_MAX_SOURCE_DROP
    reference_drop: float | None = DEFAULT_MAX_REFERENCE_DROP
    min_cases: int = MIN_HOLDOUT_CASES
    force: bool = False
    never_default: bool = False
    own_source_only: bool = False
    device: str = "cpu"
    precision: str = "fp32"


@dataclass(frozen=True)
class GateVerdict:
    """The gate's answer: make the candidate the default?, why, and the comparison behind it (or None)."""
    promote: bool
    reason: str
    comparison: dict | None = None


def _score(metrics: dict, class_ids: Sequence[str], metric: str) -> float:
    kind = "dice" if "dice" in metric else "iou"
    vals = [metrics[kind].get(c) for c in class_ids]
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(sum(vals) / len(vals)) if vals else float("nan")


def _recorded_val(pkg: ModelPackage) -> tuple[dict | None, tuple]:
    val = pkg.manifest.get("metrics", {}).get("validation")
    tr = pkg.manifest.get("training", {})
    cases = tuple(sorted(tr.get("val_cases") or []))
    files = {e["case"]: (e["image_sha256"], e["label_sha256"]) for e in (tr.get("data_manifest") or [])}
    key = tuple((c, files.get(c)) for c in cases)
    return val, key


def _per_class(cand: dict, cur: dict, class_ids: Sequence[str], kind: str = "dice") -> dict:
    out = {}
    for c in class_ids:
        a, b = cand[kind].get(c), cur[kind].get(c)
        a = None if a is None or (isinstance(a, float) and math.isnan(a)) else float(a)
        b = None if b is None or (isinstance(b, float) and math.isnan(b)) else float(b)
        out[c] = {"candidate": a, "current": b, "delta": None if a is None or b is None else a - b}
    return out


def _per_source(cand: dict, cur: dict, class_ids: Sequence[str]) -> dict:
    """``{source: {class: {"candidate", "current", "delta"}}}`` of level-range Dice, for every source
    both were scored on (the pooled ``"all"`` row left out: the mean already says that)."""
    out: dict = {}
    for src in sorted(set(cand) & set(cur) - {"all"}):
        for cid in class_ids:
            a, b = cand[src].get(cid), cur[src].get(cid)
            if a is not None and b is not None:
                out.setdefault(src, {})[cid] = {"candidate": float(a), "current": float(b), "delta": float(a - b)}
    return out


def compare(candidate: ModelPackage, current: ModelPackage, case_list: Sequence[Case] | None, *,
            metric: str = "mean_dice_fg", device="cpu", precision: str = "fp32") -> dict:
    """Both models scored on the same cases.

    Returns ``{"candidate", "current" (means), "current_ref", "classes", "per_class": {id: {"candidate",
    "current", "delta"}}, "cases", "source": "evaluated" | "recorded"}``.
    """
    common = [c for c in candidate.schema.ids if c != "background" and c in current.schema.ids]
    if not common:
        raise PackageError(f"{candidate.ref} and {current.ref} share no foreground class; cannot compare")
    kind = "dice" if "dice" in metric else "iou"
    if metric == "level_range_dice" and not case_list:
        raise PackageError("the level_range_dice gate needs cases to evaluate: pass --data (or --cases)")
    if case_list:
        from LumbarSegmentLib.inference.engine import SegmentOptions

        from .evaluate import evaluate_packages

        options = SegmentOptions(device=str(device), precision=precision)
        res = evaluate_packages({"candidate": [candidate], "current": [current]}, case_list, options, surface=())
        cm, dm = res["candidate"]["metrics"], res["current"]["metrics"]
        if metric == "level_range_dice":  # Dice inside the spine levels each manual label covers
            cm, dm = ({**m, "dice": r.get("level_range", {}).get("all", {})} for m, r in
                      ((cm, res["candidate"]), (dm, res["current"])))
        cases, source = [c.case_id for c in case_list], "evaluated"
        per_source = _per_source(res["candidate"].get("level_range", {}), res["current"].get("level_range", {}),
                                 common)
    else:
        cm, ck = _recorded_val(candidate)
        dm, dk = _recorded_val(current)
        if cm is None or dm is None or not ck or ck != dk or any(f is None for _, f in ck):
            raise PackageError(
                f"cannot compare with the model in use ({current.ref}) without evaluating: their recorded validation "
                f"metrics are missing or come from different validation cases. Pass --data (its held-out cases "
                f"are used) or --cases to evaluate both, or --force to make it the default anyway.")
        cases, source = [c for c, _ in ck], "recorded"
        per_source = {}
    return {"per_source": per_source, "candidate": _score(cm, common, metric), "current": _score(dm, common, metric),
            "current_ref": current.ref, "classes": common, "per_class": _per_class(cm, dm, common, kind),
            "metric": metric, "cases": cases, "source": source}


def format_comparison(comparison: dict, schema=None) -> str:
    """The per-class table a person reads before trusting the gate (plain text, one class a line)."""
    kind = "Dice" if "dice" in comparison.get("metric", "dice") else "IoU"
    rows = [f"{'class':<28} {'in use':>8} {'candidate':>9} {'change':>8}"]
    if "per_class" not in comparison:  # only the reference set was graded
        return "\n".join(rows + _reference_rows(comparison["reference"], schema))
    for cid, r in comparison["per_class"].items():
        name = schema[cid].name if schema is not None and cid in schema.ids else cid

        def f(v, sign=""):
            return f"{v:{sign}.3f}" if v is not None else "-"
        rows.append(f"{name:<28} {f(r['current']):>8} {f(r['candidate']):>9} {f(r['delta'], '+'):>8}")
    rows.append(f"{'mean ' + kind + ' (foreground)':<28} {comparison['current']:>8.3f} {comparison['candidate']:>9.3f} "
                f"{comparison['candidate'] - comparison['current']:>+8.3f}")
    for src, by_class in comparison.get("per_source", {}).items():
        for cid, r in by_class.items():
            name = schema[cid].name if schema is not None and cid in schema.ids else cid
            rows.append(f"{(src + ': ' + name)[:28]:<28} {r['current']:>8.3f} {r['candidate']:>9.3f} "
                        f"{r['delta']:>+8.3f}   (level range)")
    rows.append(f"in use: {comparison['current_ref']}; cases ({comparison['source']}): {', '.join(comparison['cases'])}")
    if comparison.get("reference"):
        rows += _reference_rows(comparison["reference"], schema)
    return "\n".join(rows)


def _reference_rows(ref: dict, schema=None) -> list[str]:
    """The reference set's per-source lines of the gate's table."""
    rows = []
    for src, by_class in ref.get("per_source", {}).items():
        for cid, r in by_class.items():
            name = schema[cid].name if schema is not None and cid in schema.ids else cid
            rows.append(f"{('ref ' + src + ': ' + name)[:28]:<28} {r['current']:>8.3f} {r['candidate']:>9.3f} "
                        f"{r['delta']:>+8.3f}   (reference set, level range)")
    rows.append(f"reference set ({len(ref.get('cases', []))} cases, allowed drop {ref.get('max_drop') or 0:.3f} per "
                f"source): {', '.join(ref.get('cases', []))}")
    return rows


def _unseen(candidate: ModelPackage, case_list: Sequence[Case], catalog: Catalog | None = None
            ) -> tuple[list[Case], list[str]]:
    """The cases whose patient neither the candidate nor any model it was fine-tuned from trained on, and
    the ids dropped (``registry.lineage.trained_patients``: the rule the validation report follows too)."""
    lineage = trained_patients(candidate, catalog)
    if lineage.missing:
        log.warning("the training cases of %s are unknown: their patients may be graded on", ", ".join(lineage.missing))
    return [c for c in case_list if not lineage.saw(c)], [c.case_id for c in case_list if lineage.saw(c)]


def _forgotten(comparison: dict, max_drop: float | None) -> list[str]:
    """The (source, class) pairs on which the candidate lost more than ``max_drop`` level-range Dice."""
    if max_drop is None:
        return []
    return [f"{src} {cid} {r['delta']:+.3f}" for src, by_class in comparison.get("per_source", {}).items()
            for cid, r in by_class.items() if r["delta"] < -max_drop]


def grade_reference(candidate: ModelPackage, current: ModelPackage, reference: Sequence[Case], *, device="cpu",
                    precision: str = "fp32", max_drop: float | None = DEFAULT_MAX_REFERENCE_DROP) -> dict:
    """Both models on the reference set (``training.reference``): level-range Dice per source, and the
    (source, class) pairs the candidate loses more than ``max_drop`` on (``"lost"``). Every reference
    case counts, trained on or not: a drop on a case it rehearsed is forgetting too."""
    comp = compare(candidate, current, list(reference), metric="level_range_dice", device=device,
                   precision=precision)
    return {"per_source": comp["per_source"], "cases": comp["cases"], "current_ref": current.ref,
            "max_drop": max_drop, "lost": _forgotten(comp, max_drop)}


def _reference_verdict(ref: dict | None, own_source_only: bool) -> str:
    """What the reference set adds to the gate's reason ("" when nothing)."""
    if not ref:
        return ""
    if not ref["lost"]:
        return f"; on the reference set of {', '.join(sorted(ref['per_source']))} it loses no more than " \
               f"{ref['max_drop']:.3f} on any source"
    lost = ", ".join(ref["lost"])
    if own_source_only:
        return f"; on the reference set it loses {lost}, accepted because only the team's own source matters " \
               f"(--own-source-only)"
    return f"; but on the reference set it loses more than {ref['max_drop']:.3f} on {lost} (it forgot what the model " \
           f"in use knew; publish with --own-source-only if only your own source matters)"


def _decide(pkg: ModelPackage, catalog: Catalog, case_list, policy: GatePolicy,
            reference: Sequence[Case] | None = None) -> GateVerdict:
    """The gate itself.

    A better mean is not enough when ``policy.max_drop`` is set: a candidate that gains on one source
    and loses more than ``max_drop`` on another (a fine-tune that forgets) is refused too. With
    ``reference`` cases (the shipped reference set) the candidate is also refused when it loses more
    than ``policy.reference_drop`` on any of their sources, unless ``policy.own_source_only``; the
    comparison then holds their result under ``"reference"``.
    """
    current_ref = catalog.default_ref()
    if policy.never_default:
        return GateVerdict(False, "--no-default")
    if not current_ref:
        return GateVerdict(True, "no registry has a default model")
    current = catalog.default()
    ref = grade_reference(pkg, current, reference, device=policy.device, precision=policy.precision,
                          max_drop=policy.reference_drop) if reference else None
    refused = bool(ref and ref["lost"] and not policy.own_source_only)
    held_out = _decide_held_out(pkg, current, current_ref, case_list, policy, catalog)
    why = held_out.reason + _reference_verdict(ref, policy.own_source_only)
    comparison = {**(held_out.comparison or {}), "reference": ref} if ref else held_out.comparison
    return GateVerdict(held_out.promote and not (refused and not policy.force), why, comparison)


def _decide_held_out(pkg: ModelPackage, current: ModelPackage, current_ref: str, case_list,
                     policy: GatePolicy, catalog: Catalog | None = None) -> GateVerdict:
    """The verdict of the team's held-out cases (or the recorded metrics)."""
    force, metric, max_drop = policy.force, policy.metric, policy.max_drop
    if force and not case_list:
        return GateVerdict(True, "forced")
    problem = provenance_problem(pkg.manifest, trusted=_is_shipped(pkg.path))
    if problem:  # without a trustworthy list of its training cases it could be graded on them
        why = (f"not graded: {problem}, so the gate cannot keep its own training cases out of the grading; "
               f"export it again from its training run with this version (lumbarseg-train export), or --force")
        return GateVerdict(True, f"forced; {why}") if force else GateVerdict(False, why)
    short = ""
    if case_list is not None:
        case_list, seen = _unseen(pkg, case_list, catalog)
        if seen:
            log.warning("not grading on %s: the candidate trained on them or on their patients", ", ".join(seen))
        if len(case_list) < policy.min_cases:
            short = (f"only {len(case_list)} held-out case(s) the candidate never trained on (at least "
                     f"{policy.min_cases} needed to replace {current_ref}); export more cases, hold 2 of yours out "
                     f"before fine-tuning (lumbarseg-train holdout --data DATA --cases A,B), or --force")
            if not case_list:
                return GateVerdict(True, f"forced; {short}") if force else GateVerdict(False, short)
    comparison = compare(pkg, current, case_list, metric=metric, device=policy.device, precision=policy.precision)
    c, d = comparison["candidate"], comparison["current"]
    better = (not math.isnan(c)) and (math.isnan(d) or c >= d)
    why = (f"{metric} {c:.4f} {'>=' if better else '<'} {d:.4f} of {current_ref} (in use) on "
           f"{', '.join(comparison['cases'])} ({comparison['source']})")
    lost = _forgotten(comparison, max_drop)
    if lost:
        better = False
        why += f"; but it loses more than {max_drop:.3f} on {', '.join(lost)}"
    if force:
        # promoted anyway, but the record keeps what the held-out cases said (a forced choice
        # should be one made with the numbers in view, e.g. for robustness the gate cannot see)
        return GateVerdict(True, f"forced; the gate said: {why}", comparison)
    if short:
        return GateVerdict(False, f"{short}; {why}", comparison)
    return GateVerdict(better, why, comparison)


def publish_if_better(candidate: ModelPackage | str | Path, registry: Registry, policy: GatePolicy | None = None, *,
                      cases: Sequence[Case] | None = None, reference: Sequence[Case] | None = None,
                      ensemble: Sequence[str] | None = None, name: str | None = None,
                      registries: list[Registry] | None = None) -> dict:
    """Publish (as a version of ``name`` when given); returns ``{"ref", "default": bool, "reason", "comparison", "table", "registry"}``.

    ``policy`` (default ``GatePolicy()``) says how the candidate is judged; ``cases`` are the held-out
    cases it is graded on (None: the manifests' recorded metrics). ``registries`` is the catalogue the
    model in use and the version number come from (default: ``Catalog.around(registry)``, the user's and
    the shipped registries). ``reference``: cases of every source the model in use knows
    (``training.reference.reference_cases()``, what the command line passes); a candidate that loses
    more than ``policy.reference_drop`` on one of their sources is not made the default unless
    ``policy.own_source_only``, which the published manifest records (``publish.own_source_only``) with
    the reference set's per-source change.
    """
    policy = policy or GatePolicy()
    pkg = candidate if isinstance(candidate, ModelPackage) else read_package(candidate)
    pkg.verify()
    if name:
        validate_name(name, "--name")
    catalog = Catalog.around(registry, registries)
    line = name or pkg.name
    new_ref = f"{line}@{catalog.version_for(line, registry)}"
    ens = None if ensemble is None else [new_ref if r in ("@new", line) else r for r in ensemble]
    if ens is not None:  # before the (slow) grading and before anything is written
        check_ensemble_refs(ens, catalog._owners(skip_broken=True), new_ref)
    verdict = _decide(pkg, catalog, cases, policy, reference)
    reason, comparison = verdict.reason, verdict.comparison
    record = publish_record(comparison, policy.own_source_only, reason)
    published = registry.publish(pkg, make_default=verdict.promote, ensemble=ens, catalog=catalog, name=name,
                                 record=record)
    out = {"ref": published.ref, "default": catalog.default_ref() == published.ref, "reason": reason,
           "comparison": comparison, "registry": str(registry.root),
           "table": format_comparison(comparison, pkg.schema) if comparison else "", "record": record}
    log.info("published %s (%s): %s", published.ref, "default" if out["default"] else "not default", reason)
    _append_publish_log(registry, out, pkg)
    return out


def publish_record(comparison: dict | None, own_source_only: bool, reason: str) -> dict:
    """What the published manifest keeps of the gate (its ``publish`` field): whether the team said
    only its own source matters, and the reference set's per-source change."""
    ref = (comparison or {}).get("reference") or {}
    return clean({"own_source_only": bool(own_source_only), "reason": reason,
                  "reference": {"per_source": ref.get("per_source"), "lost": ref.get("lost"),
                                "max_drop": ref.get("max_drop"), "cases": ref.get("cases")} if ref else None})


PUBLISH_LOG = "publish_log.jsonl"


def _append_publish_log(registry: Registry, out: dict, pkg: ModelPackage) -> None:
    """One JSON line per publish in ``<registry>/publish_log.jsonl``: which ref, whether it became
    the default and why (a forced promotion keeps the gate's verdict), the per-source comparison.
    The registry's index says what is in use; this says how it got there."""
    comp = out["comparison"] or {}
    entry = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "ref": out["ref"], "default": out["default"],
             "reason": out["reason"], "weights_sha256": pkg.manifest.get("weights", {}).get("sha256"),
             "parent": (pkg.manifest.get("parent") or {}).get("ref"),
             "comparison": {k: comp.get(k) for k in ("metric", "candidate", "current", "current_ref", "cases", "per_source",
                                                     "reference") if k in comp},
             "own_source_only": bool((out.get("record") or {}).get("own_source_only"))}
    try:
        with open(Path(registry.root) / PUBLISH_LOG, "a", encoding="utf-8") as f:
            f.write(json.dumps(clean(entry)) + "\n")
    except OSError as exc:  # the model is published and in the index; only the log line is missing
        log.warning("published, but could not append to %s: %s", PUBLISH_LOG, exc.strerror or exc)


def publish_cli(a) -> int:
    from LumbarSegmentLib.core.progress import ProgressLog

    from .trainer import resolve_device

    pkg = read_package(a.package)
    registry = Registry(a.registry or user_registry_root())
    case_list = None
    if a.data:
        dataset = Dataset(a.data, getattr(a, "patients", None) or None)
        ids = [s.strip() for s in (a.cases or "").split(",") if s.strip()]
        if ids:
            case_list = dataset.cases(ids)
        else:
            case_list = dataset.held_out()  # a dataset folder is input: publish never writes into it
            log.info("grading on the dataset's held-out cases: %s", ", ".join(c.case_id for c in case_list) or "none")
    ensemble = [s.strip() for s in a.ensemble.split(",")] if a.ensemble else None
    refine = bool(getattr(a, "refine", False))
    if refine and "guidance" not in pkg.manifest["input"]:
        raise PackageError(f"{pkg.path} is not a click-guided model (its manifest has no input.guidance); "
                           f"--refine publishes models trained with lumbarseg-train guidance")
    reference = _reference_for(a)
    policy = GatePolicy(
        metric=a.metric, force=a.force and not refine, never_default=a.no_default or refine, device=str(resolve_device(a.device)),
        precision=a.precision, own_source_only=a.own_source_only,
        max_drop=None if a.max_source_drop is None or a.max_source_drop < 0 else a.max_source_drop,
        reference_drop=None if a.max_reference_drop < 0 else a.max_reference_drop)
    res = publish_if_better(pkg, registry, policy, cases=case_list, reference=reference, ensemble=ensemble,
                            name=a.name)
    if refine:
        registry.set_refine(res["ref"])
    parent = ((getattr(pkg, "manifest", None) or {}).get("parent") or {}).get("ref")
    compared = [(res["comparison"] or {}).get("current_ref"), parent]
    effort = _effort_rows(a.data, [m for m in compared if m]) if a.data else []
    if effort:  # what correcting the drafts of the model in use and of the parent cost, next to the scores
        from LumbarSegmentLib.dataset.effort import markdown

        section = "annotation effort per drafting model (this dataset's exports):\n" + markdown(effort)
        res["table"] = f"{res['table']}\n\n{section}" if res["table"] else section
    if res["table"]:
        print(res["table"])
    print(f"published {res['ref']} to {res['registry']}; "
          f"{'it is now the default' if res['default'] else 'the model in use is unchanged'} ({res['reason']})")
    ProgressLog.from_environment().write("publish", ref=res["ref"], default=res["default"], reason=res["reason"],
                                         table=res["table"], comparison=res["comparison"], effort=effort)
    return 0


def _effort_rows(data, models: Sequence[str] = ()) -> list[dict]:
    """The effort ledger's summary of a dataset, limited to ``models`` when given (the model in use and the
    candidate's parent: the drafts a person corrected before this candidate existed); empty when none of
    those exports recorded any effort."""
    from LumbarSegmentLib.dataset.cases import list_cases
    from LumbarSegmentLib.dataset.effort import summarise

    from .data import data_folders

    rows = summarise([c for folder in data_folders(data) for c in list_cases(folder)])
    if models:
        rows = [r for r in rows if r["model"] in models]
    return rows if any(r["cases"] for r in rows) else []


def _reference_for(a) -> list[Case]:
    """The reference cases of a publish command: ``--reference DIR``, else the shipped set."""
    from .reference import reference_cases, reference_root

    cases = reference_cases(getattr(a, "reference", None))
    if cases:
        log.info("grading on the reference set too: %s", ", ".join(c.case_id for c in cases))
    else:
        where = getattr(a, "reference", None) or reference_root()
        log.warning("no reference cases in %s: the gate sees only the held-out cases", where)
    return cases
