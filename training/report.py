"""Reports: tables in the seed's layout (classes as rows, models as columns), curves and bar charts.

Plots use matplotlib's non-interactive Agg backend (no display needed).
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Mapping, Sequence

CLASS_MEAN_ROWS = (("mean (with background)", "mean_{m}"), ("mean (without background)", "mean_{m}_fg"))


def fmt(v, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}"


def _class_names(schema) -> dict:
    return {c.id: c.name for c in schema.classes} if schema is not None else {}


def table_rows(results: Mapping[str, dict], class_ids: Sequence[str], metric: str = "dice") -> list[list]:
    """Rows ``[class id, value per model...]`` + the two mean rows; ``results[model] = metrics dict``."""
    rows = []
    for cid in class_ids:
        rows.append([cid] + [results[m][metric].get(cid) for m in results])
    for label, key in CLASS_MEAN_ROWS:
        rows.append([label] + [results[m].get(key.format(m=metric)) for m in results])
    return rows


def markdown_table(results: Mapping[str, dict], class_ids: Sequence[str], metric: str = "dice",
                   schema=None, digits: int = 4) -> str:
    names = _class_names(schema)
    metric_name = {"dice": "Dice", "iou": "IoU"}[metric]
    head = f"| {metric_name} | " + " | ".join(results) + " |"
    sep = "|---|" + "---:|" * len(results)
    lines = [head, sep]
    for row in table_rows(results, class_ids, metric):
        label = names.get(row[0], row[0])
        lines.append(f"| {label} | " + " | ".join(fmt(v, digits) for v in row[1:]) + " |")
    return "\n".join(lines)


def csv_table(results: Mapping[str, dict], class_ids: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["metric", "class"] + list(results))
    for metric in ("iou", "dice"):
        for row in table_rows(results, class_ids, metric):
            w.writerow([metric, row[0]] + ["" if v is None or v != v else f"{v:.6f}" for v in row[1:]])
    return buf.getvalue()


def per_case_markdown(per_case: Mapping[str, Mapping[str, dict]], class_ids: Sequence[str], schema=None,
                      digits: int = 4) -> str:
    """``per_case[model][case] = {"dice": {...}, "iou": {...}}`` -> one row per (case, class)."""
    names = _class_names(schema)
    models = list(per_case)
    head = "| case | class | " + " | ".join(f"{m} Dice | {m} IoU" for m in models) + " |"
    sep = "|---|---|" + "---:|---:|" * len(models)
    lines = [head, sep]
    cases = sorted({c for m in models for c in per_case[m]})
    for case in cases:
        for cid in class_ids:
            vals = []
            present = False
            for m in models:
                d = per_case[m].get(case, {})
                dv, iv = d.get("dice", {}).get(cid), d.get("iou", {}).get(cid)
                present |= dv is not None
                vals += [fmt(dv, digits), fmt(iv, digits)]
            if present and cid != "background":
                lines.append(f"| {case} | {names.get(cid, cid)} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_learning_curves(history: Sequence[dict], path: Path, title: str = "") -> Path:
    plt = _plt()
    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot(ep, [h["loss"] for h in history], "o-", ms=3, label="train loss")
    ax[0].set_xlabel("epoch")
    ax[0].set_ylabel("loss")
    ax[0].set_yscale("log")
    ax[0].grid(alpha=0.3)
    ax2 = ax[0].twinx()
    ax2.plot(ep, [h["lr"] for h in history], color="gray", lw=1, label="lr")
    ax2.set_ylabel("learning rate", color="gray")
    vals = [(h["epoch"], h["val"]) for h in history if h.get("val")]
    if vals:
        ids = list(vals[0][1]["dice"])
        for cid in ids[1:]:
            ax[1].plot([e for e, _ in vals], [v["dice"][cid] for _, v in vals], "o-", ms=3, label=f"Dice {cid}")
        ax[1].plot([e for e, _ in vals], [v["mean_dice_fg"] for _, v in vals], "k--", label="mean Dice (fg)")
        ax[1].plot([e for e, _ in vals], [v["mean_iou_fg"] for _, v in vals], "k:", label="mean IoU (fg)")
        ax[1].set_ylim(0, 1)
        ax[1].legend(fontsize=7, loc="lower right")
    ax[1].set_xlabel("epoch")
    ax[1].set_ylabel("validation")
    ax[1].grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_per_class(results: Mapping[str, dict], class_ids: Sequence[str], path: Path, metric: str = "dice",
                   schema=None, title: str = "") -> Path:
    plt = _plt()
    names = _class_names(schema)
    models = list(results)
    n = len(models)
    width = 0.8 / max(1, n)
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(class_ids) + 2), 3.6))
    for i, m in enumerate(models):
        vals = [results[m][metric].get(c) for c in class_ids]
        vals = [0 if v is None or v != v else v for v in vals]
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(class_ids))]
        bars = ax.bar(xs, vals, width, label=m)
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(class_ids)))
    ax.set_xticklabels([names.get(c, c) for c in class_ids], fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel({"dice": "Dice", "iou": "IoU"}[metric])
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_history_csv(history: Sequence[dict], path: Path) -> Path:
    ids = []
    for h in history:
        if h.get("val"):
            ids = list(h["val"]["dice"])
            break
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "step", "loss", "lr"] + [f"dice_{c}" for c in ids] + [f"iou_{c}" for c in ids]
                   + ["mean_dice_fg", "mean_iou_fg"])
        for h in history:
            v = h.get("val") or {}
            row = [h["epoch"], h["step"], f"{h['loss']:.6f}", f"{h['lr']:.3e}"]
            row += [fmt(v.get("dice", {}).get(c), 6) if v else "" for c in ids]
            row += [fmt(v.get("iou", {}).get(c), 6) if v else "" for c in ids]
            row += [fmt(v.get("mean_dice_fg"), 6) if v else "", fmt(v.get("mean_iou_fg"), 6) if v else ""]
            w.writerow(row)
    return path


def write_run_report(out_dir: Path, history, val_metrics, per_case, schema, name: str = "model") -> None:
    out_dir = Path(out_dir)
    write_history_csv(history, out_dir / "history.csv")
    if history:
        plot_learning_curves(history, out_dir / "learning_curves.png", title=name)
    if val_metrics:
        ids = schema.ids
        res = {name: val_metrics}
        plot_per_class(res, ids, out_dir / "per_class_dice.png", "dice", schema, title=f"{name}: validation Dice")
        md = [f"# {name}: validation", "", markdown_table(res, ids, "dice", schema), "",
              markdown_table(res, ids, "iou", schema), ""]
        if per_case:
            md += ["## Per case", "", per_case_markdown({name: per_case}, ids, schema), ""]
        (out_dir / "metrics.md").write_text("\n".join(md))
        (out_dir / "metrics.csv").write_text(csv_table(res, ids))
