"""Publish a package into a registry; it becomes the default only if it is at least as good.

"As good" is decided on the same frozen validation cases for both models: the
candidate and the registry's current default are evaluated on those cases (mean Dice,
or IoU, over the foreground classes both schemas have) and the candidate becomes the
default if its score is >= the default's. Without a dataset, the metrics recorded in
the two manifests are compared only if they were computed on the same validation cases
(same ids and file checksums); otherwise publishing as default needs the data or
``--force``. Earlier versions are never removed.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Sequence

from LumbarSegmentLib.cases import Case
from LumbarSegmentLib.packages import ModelPackage, PackageError, Registry, read_package, user_registry_root

log = logging.getLogger("lumbarseg.train")


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


def compare(candidate: ModelPackage, current: ModelPackage, case_list: Sequence[Case] | None, *,
            metric: str = "mean_dice_fg", device="cpu", amp: str = "off") -> dict:
    """Scores of both on the same cases: ``{"candidate", "current", "classes", "cases", "source"}``."""
    common = [c for c in candidate.schema.ids if c != "background" and c in current.schema.ids]
    if not common:
        raise PackageError(f"{candidate.ref} and {current.ref} share no foreground class; cannot compare")
    if case_list:
        from .evaluate import evaluate_packages

        res = evaluate_packages({"candidate": [candidate], "current": [current]}, case_list, device=device, amp=amp)
        return {"candidate": _score(res["candidate"]["metrics"], common, metric),
                "current": _score(res["current"]["metrics"], common, metric), "classes": common,
                "cases": [c.case_id for c in case_list], "source": "evaluated"}
    cv, ck = _recorded_val(candidate)
    dv, dk = _recorded_val(current)
    if cv is None or dv is None or not ck or ck != dk or any(f is None for _, f in ck):
        raise PackageError(
            "cannot compare with the current default without evaluating: their recorded validation metrics are "
            "missing or come from different validation cases. Pass --data (and --cases) to evaluate both, or "
            "--force to make it the default anyway.")
    return {"candidate": _score(cv, common, metric), "current": _score(dv, common, metric), "classes": common,
            "cases": [c for c, _ in ck], "source": "recorded"}


def publish_if_better(candidate: ModelPackage | str | Path, registry: Registry, *,
                      case_list: Sequence[Case] | None = None, metric: str = "mean_dice_fg", force: bool = False,
                      never_default: bool = False, ensemble: Sequence[str] | None = None, device="cpu",
                      amp: str = "off") -> dict:
    """Publish; returns ``{"ref", "default": bool, "reason", "comparison"}``."""
    pkg = candidate if isinstance(candidate, ModelPackage) else read_package(candidate)
    pkg.verify()
    current_ref = registry.default_ref()
    comparison = None
    if never_default:
        make_default, reason = False, "--no-default"
        if not current_ref:
            log.warning("the registry has no default; the first package published becomes it anyway")
    elif not current_ref:
        make_default, reason = True, "the registry had no default model"
    elif force:
        make_default, reason = True, "forced"
    else:
        current = registry.get(current_ref)
        comparison = compare(pkg, current, case_list, metric=metric, device=device, amp=amp)
        c, d = comparison["candidate"], comparison["current"]
        make_default = (not math.isnan(c)) and (math.isnan(d) or c >= d)
        reason = (f"{metric} {c:.4f} {'>=' if make_default else '<'} {d:.4f} of the default {current_ref} "
                  f"on {', '.join(comparison['cases'])} ({comparison['source']})")
    new_ref = f"{pkg.name}@{registry.next_version(pkg.name)}"
    ens = None if ensemble is None else [new_ref if r in ("@new", pkg.name) else r for r in ensemble]
    published = registry.publish(pkg, make_default=make_default, ensemble=ens)
    out = {"ref": published.ref, "default": registry.default_ref() == published.ref, "reason": reason,
           "comparison": comparison, "registry": str(registry.root)}
    log.info("published %s (%s): %s", published.ref, "default" if out["default"] else "not default", reason)
    return out


def publish_cli(a) -> int:
    from .data import select_cases
    from .trainer import resolve_device

    pkg = read_package(a.package)
    registry = Registry(a.registry or user_registry_root())
    case_list = None
    if a.data:
        ids = [s.strip() for s in (a.cases or "").split(",") if s.strip()] or \
            list(pkg.manifest.get("training", {}).get("val_cases") or [])
        if not ids:
            raise PackageError("no frozen validation cases: pass --cases (the candidate records none)")
        case_list = select_cases(a.data, ids)
    ensemble = [s.strip() for s in a.ensemble.split(",")] if a.ensemble else None
    res = publish_if_better(pkg, registry, case_list=case_list, metric=a.metric, force=a.force,
                            never_default=a.no_default, ensemble=ensemble, device=resolve_device(a.device),
                            amp=a.amp)
    print(f"published {res['ref']} to {res['registry']}; "
          f"{'it is now the default' if res['default'] else 'the default is unchanged'} ({res['reason']})")
    return 0
