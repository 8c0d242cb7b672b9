"""What ``lumbarseg models`` prints for each installed model (a row of JSON, or one line of text).

A package's parent is the model it was fine-tuned from; the shipped registry does not carry
every parent, so a parent that is not installed is marked as such (``--model`` cannot load it).
The metrics are the ones its manifest records on its validation cases (mean foreground Dice and
IoU, Dice per class, how many cases); a package that records none has no ``metrics`` key.
"""
from __future__ import annotations


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # NaN: a class never graded


def validation_summary(manifest: dict) -> dict:
    """The manifest's recorded validation metrics, reduced to what a listing needs ({} when none)."""
    metrics = manifest.get("metrics") or {}
    if metrics.get("summary"):
        return dict(metrics["summary"])
    val = metrics.get("validation") or {}
    out = {k: round(float(val[k]), 4) for k in ("mean_dice_fg", "mean_iou_fg") if _number(val.get(k))}
    dice = val.get("dice")
    if isinstance(dice, dict):
        out["dice"] = {c: round(float(v), 4) for c, v in dice.items() if c != "background" and _number(v)}
    if isinstance(val.get("cases"), list):
        out["cases"] = len(val["cases"])
    return out


def model_row(entry, installed: set[str]) -> dict:
    """One ``CatalogEntry`` as the JSON listing shows it; ``installed`` is every ref the catalogue has."""
    pkg = entry.package
    parent = (pkg.parent or {}).get("ref")
    row = {"ref": pkg.ref, "variant": pkg.manifest["architecture"].get("variant"), "schema": pkg.schema.name,
           "spacing_mm": list(pkg.spacing), "source": entry.source, "registry": str(entry.registry.root),
           "default": entry.default, "ensemble": entry.ensemble, "parent": parent,
           "parent_installed": None if parent is None else parent in installed, "sha256": pkg.sha256,
           "own_source_only": bool((pkg.manifest.get("publish") or {}).get("own_source_only"))}
    summary = validation_summary(pkg.manifest)
    if summary:
        row["metrics"] = summary
    return row


def model_line(row: dict) -> str:
    """One row as a line of text: ref, variant, schema, spacing, flags, validation Dice, origin, checksum."""
    flags = ("default " if row["default"] else "") + ("ensemble" if row["ensemble"] else "")
    origin = row["source"]
    if row["parent"]:
        origin += f", fine-tuned from {row['parent']}" + ("" if row["parent_installed"] else " (not installed)")
    if row.get("own_source_only"):
        origin += " [own source only: may have forgotten other sources]"
    dice = (row.get("metrics") or {}).get("mean_dice_fg")
    score = f"val Dice {dice:.3f}" if isinstance(dice, (int, float)) else "val Dice -    "
    return (f"{row['ref']:<22} {row['variant'] or '?':<6} schema={row['schema']:<9} spacing={row['spacing_mm']} "
            f"{flags:<17} {score}  {origin}  sha256 {row['sha256'][:12]}")


__all__ = ["model_row", "model_line", "validation_summary"]
