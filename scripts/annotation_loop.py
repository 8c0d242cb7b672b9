#!/usr/bin/env python
"""The annotation loop measured through the product's own commands, on a source the model does not know.

Issue 9's experiment: start from a model trained without the water-fat (VB3) source (``--start``;
docs/annotation_loop.md gives the command that trains it), then for N = 5, 10, 20 unseen
water-fat cases repeat what a team does:

1. ``lumbarseg segment`` drafts each new case with the model in use (the team registry's default);
2. the annotator's correction is simulated by the manual label, exported in the case format
   (``cases.write_case``, with ``drafted_by`` = the drafting model) into the team's dataset;
3. ``lumbarseg-train finetune --from <model in use>`` on the whole dataset, then
   ``lumbarseg-train publish``, whose gate compares the candidate with the model in use on the
   dataset's frozen held-out cases and promotes it only if its mean is at least as good and no
   source falls by more than the gate's ``--max-source-drop``;
4. ``lumbarseg-train evaluate`` scores the model in use (and each candidate) on fixed cases of every
   source (strict and level-range Dice per source), none of which is ever exported.

With ``--rehearse`` the team's dataset starts with the cases the start model was trained and
validated on, so every fine-tune rehearses the old sources; ``--holdout-extra`` freezes some of
them as held-out cases too, so the gate sees every source. Every step runs as a separate process
exactly as a user would type it (``LUMBARSEG_HOME`` points the user registry at the work folder).
Writes ``loop.json``, ``loop.md`` and ``loop.png`` into ``--out``.

    python scripts/annotation_loop.py --work runs/loop3 --out docs/img/loop --start runs/uvd-nowf/package \
        --rehearse --holdout-extra VB1_10,VB2_05,VB2_17,IVD_20 --balance sources --lr 1e-4 ...
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from LumbarSegmentLib.dataset.cases import read_patient_map, write_case  # noqa: E402
from LumbarSegmentLib.dataset.holdout import frozen_split  # noqa: E402
from LumbarSegmentLib.formats.io import read_volume  # noqa: E402
from LumbarSegmentLib.core.schema import load_schema  # noqa: E402
from LumbarSegmentLib.training.data import schema_labels, select_cases  # noqa: E402

SPLIT = REPO / "scripts" / "recipes" / "lumbar-mr-split.json"
# exported cases carry their patient, so the team's held-out split never separates one volume stored
# under two ids (the loop of docs/annotation_loop.md ran before this map existed)
PATIENT_OF = read_patient_map(REPO / "scripts" / "recipes" / "lumbar-mr-patients.json")


def run(cmd, env, log):
    t0 = time.time()
    with open(log, "a") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        r = subprocess.run([str(c) for c in cmd], env=env, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise SystemExit(f"step failed ({r.returncode}): {' '.join(map(str, cmd))}; see {log}")
    return time.time() - t0


def model_in_use(env) -> str:
    out = subprocess.run([sys.executable, "-m", "LumbarSegmentLib.cli.main", "models", "--json"], env=env,
                         capture_output=True, text=True, check=True).stdout
    defaults = [m["ref"] for m in json.loads(out) if m.get("default")]
    if len(defaults) != 1:
        raise SystemExit(f"expected exactly one default model, `lumbarseg models` lists {defaults}")
    return defaults[0]


def evaluate(ref: str, cases: list[str], data: str, env, out: Path, log) -> dict:
    run([sys.executable, "-m", "LumbarSegmentLib.training.cli", "evaluate", "--model", ref, "--data", data,
         "--cases", ",".join(cases), "--out", out, "--threads", "1"], env, log)
    r = next(iter(json.loads((out / "metrics.json").read_text()).values()))
    return {"strict": {s: m["dice"] for s, m in r["per_source"].items()}, "level_range": r["level_range"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "lumbar-mr"))
    p.add_argument("--work", help="scratch folder (user registry, dataset, runs); wiped first")
    p.add_argument("--out", required=True, help="where loop.json / loop.md / loop.png go")
    p.add_argument("--steps", default="5,10,20", help="cumulative numbers N of corrected water-fat cases")
    p.add_argument("--start", default="uvd-starter@1", help="the model in use at N = 0")
    p.add_argument("--minutes", type=float, default=5.0, help="wall-time budget of each fine-tune")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--steps-per-epoch", type=int, default=20)
    p.add_argument("--lr", default="1e-4", help="fine-tune learning rate (a short fine-tune at 3e-4 first loses "
                                                 "more than it gains: docs/annotation_loop.md)")
    p.add_argument("--intensity-aug", default="strong")
    p.add_argument("--balance", default="structures", help="finetune --balance (sources: every source an equal share)")
    p.add_argument("--threads", default="1", help="CPU threads of each fine-tune")
    p.add_argument("--rehearse", action="store_true",
                   help="the team's dataset starts with the cases the start model was trained and validated on "
                        "(those found in --data), exported like corrections, so every fine-tune rehearses them")
    p.add_argument("--holdout-extra", default="", help="rehearsed case ids frozen as held-out too (a multi-source "
                                                      "gate that can see forgetting)")
    p.add_argument("--pseudo-labels", action="store_true",
                   help="fine-tune with --pseudo-labels parent (the model in use drafts unannotated structures)")
    p.add_argument("--scoring", help="case ids scored after every step (default: the split's validation cases + "
                                     "IVD_20); never exported")
    p.add_argument("--max-source-drop", default=None, help="publish --max-source-drop (default: the gate's)")
    p.add_argument("--resume", action="store_true",
                   help="continue the experiment in --work (its dataset, registry and --out/loop.json) with the "
                        "steps beyond the last one done")
    p.add_argument("--replot", metavar="LOOP_JSON", help="only redraw loop.md / loop.png from a loop.json")
    a = p.parse_args(argv)
    if a.replot:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        write_report(json.loads(Path(a.replot).read_text()), Path(a.out))
        return 0

    if not a.work:
        p.error("--work is required (unless --replot)")
    split = json.loads(SPLIT.read_text())
    held = set(split["test"]) | set(split["val"])
    from LumbarSegmentLib.registry.packages import resolve_model

    start_pkg = resolve_model(a.start)
    # cases the start model never trained on, water-fat only, in a fixed order
    starter_train = set(start_pkg.manifest.get("training", {}).get("train_cases") or [])
    pool = [c.case_id for c in select_cases(a.data) if c.case_id.startswith("VB3_")
            and c.case_id not in held and c.case_id not in starter_train]
    scoring = a.scoring.split(",") if a.scoring else list(split["val"]) + ["IVD_20"]  # never exported
    if set(scoring) & starter_train:
        raise SystemExit(f"scoring cases the start model trained on: {sorted(set(scoring) & starter_train)}")
    steps = [int(x) for x in a.steps.split(",")]
    if steps[-1] > len(pool):
        raise SystemExit(f"only {len(pool)} unseen water-fat cases outside the validation/test split")

    work = Path(a.work)
    if work.exists() and not a.resume:
        shutil.rmtree(work)
    (work / "home").mkdir(parents=True, exist_ok=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "LUMBARSEG_HOME": str(work / "home"), "OMP_NUM_THREADS": "1"}
    log = work / "commands.log"
    schema = load_schema("starter")
    dataset = work / "dataset"
    rows = json.loads((out / "loop.json").read_text()) if a.resume else []
    if rows:  # continue where an earlier run of the same experiment stopped
        done, rehearsed, current = rows[-1]["N"], rows[-1].get("rehearsed", []), model_in_use(env)
        steps = [n for n in steps if n > done]
    else:
        # The team's registry starts with the start model as its default (published under the team's own
        # line), so "the model in use" is the team's whatever the shipped default is.
        run([sys.executable, "-m", "LumbarSegmentLib.training.cli", "publish", start_pkg.path, "--name", "uvd-team",
             "--force"], env, log)
        current = model_in_use(env)
        done = 0
        rehearsed = []
    if a.rehearse and not rows:  # what the model in use learnt from (and was validated on) is the team's dataset at the start
        known = starter_train | set(start_pkg.manifest.get("training", {}).get("val_cases") or [])
        for case in select_cases(a.data, sorted(known & {c.case_id for c in select_cases(a.data)})):
            export(case, dataset, schema, {"drafted_by": "manual (the start model's training data)",
                                           "source": case.case_id.split("_")[0]})
            rehearsed.append(case.case_id)
    if not rows:
        rows.append({"N": 0, "model": current, **evaluate(current, scoring, a.data, env, work / "eval_0", log)})
    for n in steps:
        new = pool[done:n]
        seg_s = 0.0
        for cid in new:
            case = select_cases(a.data, [cid])[0]
            draft = work / "drafts" / f"{cid}.nii.gz"
            draft.parent.mkdir(exist_ok=True)
            seg_s += run([sys.executable, "-m", "LumbarSegmentLib.cli.main", "segment", case.image_path, "-o", draft,
                          "--model", current, "--threads", "1", "--no-progress"], env, log)
            drafted = read_volume(draft).array
            export(case, dataset, schema, {"drafted_by": current, "source": "VB3"}, drafted)
        if done == 0:  # the team freezes its first two corrected cases (+ any named) as the gate's held-out
            extra = [x for x in a.holdout_extra.split(",") if x]
            run([sys.executable, "-m", "LumbarSegmentLib.training.cli", "holdout", "--data", dataset,
                 "--cases", ",".join(new[:2] + extra)], env, log)
        done = n
        held = frozen_split(dataset).holdout_ids  # later patients are assigned by the split's own rule
        run_dir = work / f"ft_{n}"
        ft_s = run([sys.executable, "-m", "LumbarSegmentLib.training.cli", "finetune", "--from", current,
                    "--data", dataset, "--exclude", ",".join(held), "--out", run_dir, "--patch", "192", "--batch-size", "8",
                    "--epochs", a.epochs, "--steps-per-epoch", a.steps_per_epoch, "--lr", a.lr,
                    "--intensity-aug", a.intensity_aug, "--unannotated-bg-weight", "0.05", "--threads", a.threads,
                    "--balance", a.balance, "--patience", "0", "--max-minutes", a.minutes, "--name", "uvd-team",
                    *(["--pseudo-labels", "parent"] if a.pseudo_labels else [])], env, log)
        pub_s = run([sys.executable, "-m", "LumbarSegmentLib.training.cli", "publish", run_dir / "package",
                     "--data", dataset,
                     *(["--max-source-drop", a.max_source_drop] if a.max_source_drop else [])], env, log)
        cand = evaluate(str(run_dir / "package"), scoring, a.data, env, work / f"eval_candidate_{n}", log)
        previous, current = current, model_in_use(env)
        promoted = current != previous
        gate = _last_gate(log)
        rows.append({"N": n, "model": current, "held_out": list(held), "rehearsed": rehearsed, "gate": gate, "finetune_wall_s": round(ft_s, 1),
                     "publish_wall_s": round(pub_s, 1), "candidate": cand,
                     "segment_wall_s": round(seg_s, 1),
                     **(cand if promoted else evaluate(current, scoring, a.data, env, work / f"eval_{n}", log))})
        (out / "loop.json").write_text(json.dumps(rows, indent=1))
    write_report(rows, out)
    return 0


def export(case, dataset: Path, schema, extra: dict, drafted=None) -> None:
    """The manual label stands in for the annotator's correction, exported in the case format."""
    image, label = case.load()
    truth, structures = schema_labels(case, label, schema)
    if drafted is not None:
        extra = {**extra, "draft_voxels_changed": int((drafted != truth).sum())}
    write_case(dataset, case.case_id, image, label.with_array(truth.astype(np.uint8)),
               labels={schema[s].value: s for s in structures}, annotated_structures=list(structures),
               patient=PATIENT_OF.get(case.case_id), extra=extra)


def _last_gate(log: Path) -> str:
    """The gate's verdict line from the last ``publish`` in the command log."""
    lines = [x for x in log.read_text().splitlines() if x.startswith("published ")]
    return lines[-1] if lines else ""


def write_report(rows, out: Path) -> None:
    """Table and plot of level-range Dice per source vs N: the model in use and each step's candidate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(s, c) for r in rows for s, d in r["level_range"].items() if s != "all" for c in d})
    name = lambda s, c: f"{s} {c.replace('_', ' ')}"  # noqa: E731
    lines = ["| N | model | " + " | ".join(name(s, c) for s, c in keys) + " | fine-tune wall (s) |",
             "|--:|---|" + "--:|" * len(keys) + "--:|"]
    for r in rows:
        for label, scores in (("in use: " + r["model"], r), ("candidate", r.get("candidate"))):
            if scores:
                cells = [f"{scores['level_range'].get(s, {}).get(c, float('nan')):.3f}" for s, c in keys]
                wall = r.get("finetune_wall_s", "–") if label == "candidate" else "–"
                lines.append(f"| {r['N']} | {label} | " + " | ".join(cells) + f" | {wall} |")
    (out / "loop.md").write_text("Level-range Dice per source\n\n" + "\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (s, c) in enumerate(keys):
        col = f"C{i}"
        ax.plot([r["N"] for r in rows], [r["level_range"].get(s, {}).get(c, np.nan) for r in rows], "o-", color=col,
                label=f"{name(s, c)} (in use)")
        cand = [(r["N"], r["candidate"]["level_range"].get(s, {}).get(c, np.nan)) for r in rows if r.get("candidate")]
        if cand:
            ax.plot(*zip(*([(rows[0]["N"], rows[0]["level_range"].get(s, {}).get(c, np.nan))] + cand)), "x--",
                    color=col, label=f"{name(s, c)} (candidate)")
    ax.set_xlabel("corrected water-fat cases N")
    ax.set_ylabel("level-range Dice")
    ax.grid(alpha=.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "loop.png", dpi=110)


if __name__ == "__main__":
    sys.exit(main())
