"""Training runs end to end: overfitting real slices, resume, DDP, fine-tuning, publishing, the CLI.

Everything is tiny (init_filters 4, 32-48 px patches, a few steps) so the file runs in
well under two minutes on two CPU cores.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from LumbarSegmentLib.dataset.cases import list_cases, write_case
from LumbarSegmentLib.models import build_model
from LumbarSegmentLib.registry.package import read_package, write_package
from LumbarSegmentLib.registry.registry import Registry
from LumbarSegmentLib.core.schema import LabelSchema, load_schema
from LumbarSegmentLib.core.volume import Volume
from LumbarSegmentLib.training.config import TrainConfig
from LumbarSegmentLib.training.data import CaseSlices, annotated_mask, load_case_slices
from LumbarSegmentLib.training.finetune import finetune, prepare_finetune_model
from LumbarSegmentLib.training.losses import deep_supervision_loss
from LumbarSegmentLib.training.metrics import MetricAccumulator
from LumbarSegmentLib.training.publish import GatePolicy, publish_if_better
from LumbarSegmentLib.training.run_outputs import CachedSlices, RunOutputs
from LumbarSegmentLib.training.trainer import train

NO_PACKAGE = RunOutputs(write_package=False)

torch.set_num_threads(1)  # tiny tensors; avoids oversubscribing a shared machine
REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "lumbar-mr"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared lumbar-mr data not found at {DATA} "
                                                           f"(see shared/data/README.md)")
STARTER = load_schema("starter")
TINY = dict(variant="UD", init_filters=4, epochs=4, steps_per_epoch=3, batch_size=4, patch=32, precision="fp32",
            log_every=1, progress_bar=False, warmup_steps=2, patience=0)


def _synthetic_planes(size: int, n: int, gen: torch.Generator):
    """``n`` slices with a square (vertebral body, 1) and a bright disc (intervertebral disc, 2)."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    img = torch.randn(n, size, size, generator=gen) * 0.2 + 0.5
    lab = torch.zeros(n, size, size, dtype=torch.uint8)
    for i in range(n):
        ay, ax = (int(v) for v in torch.randint(8, size // 2 - 4, (2,), generator=gen))
        by, bx = (int(v) for v in torch.randint(size // 2 + 4, size - 8, (2,), generator=gen))
        sq = ((yy - ay).abs() <= 5) & ((xx - ax).abs() <= 5)
        dk = (yy - by) ** 2 + (xx - bx) ** 2 <= 30
        img[i][sq] += 1.5
        img[i][dk] += 3.0
        lab[i][sq] = 1
        lab[i][dk] = 2
    return img, lab


def synth_slices(n_cases=4, size=48, slices=4, seed=0, schema: LabelSchema = STARTER) -> list[CaseSlices]:
    """Cached cases as the trainer sees them; even cases annotate bodies only, odd ones discs only."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for c in range(n_cases):
        img, lab = _synthetic_planes(size, slices, gen)
        structure = "vertebral_body" if c % 2 == 0 else "intervertebral_disc"
        keep = schema[structure].value
        lab = torch.where(lab == STARTER[structure].value, torch.tensor(keep, dtype=torch.uint8),
                          torch.tensor(0, dtype=torch.uint8))
        out.append(CaseSlices(f"s{seed}_{c}", f"p{seed}_{c}", img, lab, annotated_mask([structure], schema),
                              (structure,), fg_slices=list(range(slices))))
    return out


def write_synthetic_dataset(folder: Path, n_cases=4, size=40, slices=3, seed=0) -> list[str]:
    """Cases on disk in the case format (LPS identity, 1 mm): bodies-only and discs-only, alternating."""
    gen = torch.Generator().manual_seed(seed)
    ids = []
    for c in range(n_cases):
        img, lab = _synthetic_planes(size, slices, gen)
        structure = "vertebral_body" if c % 2 == 0 else "intervertebral_disc"
        lab = (lab == STARTER[structure].value).to(torch.uint8)
        # canonical [s, r, c] -> stored [k, j, i] for an identity LPS direction: s=i, r=-k, c=j
        img3 = np.ascontiguousarray(img.numpy().transpose(1, 2, 0)[::-1])
        lab3 = np.ascontiguousarray(lab.numpy().transpose(1, 2, 0)[::-1])
        vol = Volume((img3 * 100 + 50).astype(np.int16))
        cid = f"syn{c}"
        write_case(folder, cid, vol, vol.with_array(lab3), labels={1: structure}, annotated_structures=[structure])
        ids.append(cid)
    return ids


# --------------------------------------------------------------------------------------
@needs_data
def test_tiny_model_overfits_a_few_real_slices():
    cases = {c.case_id: c for c in list_cases(DATA)}
    data = [load_case_slices(cases[i], STARTER, (4.0, 4.0)) for i in ("IVD_11", "VB3_01")]
    batches = []
    for d in data:
        mid = d.fg_slices[len(d.fg_slices) // 2]
        idx = [mid - 3, mid, mid + 3]
        batches.append((d.image[idx, None], d.label[idx].long(), d.annotated[None].repeat(3, 1), d.case_id))
    torch.manual_seed(0)
    model = build_model("UD", num_classes=3, init_filters=8, deep_supervision=False)
    opt = torch.optim.Adam(model.parameters(), 3e-3)

    def miou():
        acc = MetricAccumulator(STARTER.ids)
        model.eval()
        with torch.no_grad():
            for x, y, a, cid in batches:
                acc.add(cid, model(x).argmax(1), y, a[0])
        model.train()
        return acc.compute()["mean_iou_fg"]

    iou0 = miou()
    losses = []
    for _ in range(60):
        loss = sum(deep_supervision_loss(model(x), y, a) for x, y, a, _ in batches)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    iou1 = miou()
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), (losses[:5], losses[-5:])
    print("loss", np.mean(losses[:5]), np.mean(losses[-5:]), "mean IoU (fg)", iou0, iou1)
    assert iou1 > 0.6 and iou1 > iou0 + 0.4, (iou0, iou1)


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path):
    cfg = TrainConfig(**TINY)
    tr, va = synth_slices(seed=0), synth_slices(n_cases=2, seed=1)
    full = train(cfg, [], [], out_dir=tmp_path / "full", slices=CachedSlices(tr, va), outputs=NO_PACKAGE)

    class Kill(Exception):
        pass

    def kill_after_two(rec):
        if rec["epoch"] == 2:
            raise Kill()

    with pytest.raises(Kill):
        train(cfg, [], [], out_dir=tmp_path / "cut", slices=CachedSlices(tr, va), callbacks=[kill_after_two],
              outputs=NO_PACKAGE)
    events = [json.loads(line)["event"] for line in (tmp_path / "cut" / "progress.jsonl").read_text().splitlines()]
    assert events[-1] == "error"
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=False)["epoch"] == 1  # 0-based: 2 epochs done
    resumed = train(cfg.replace(resume=True), [], [], out_dir=tmp_path / "cut", slices=CachedSlices(tr, va),
                    outputs=NO_PACKAGE)
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 3
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [h["loss"] for h in full.history] == [h["loss"] for h in resumed.history]
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]


def test_time_budget_shortens_the_schedule(tmp_path):
    cfg = TrainConfig(**{**TINY, "epochs": 5, "max_minutes": 1e-6})
    r = train(cfg, [], [], out_dir=tmp_path, slices=CachedSlices(synth_slices(), synth_slices(2, seed=1)),
              outputs=NO_PACKAGE)
    assert r.epochs_run == 1 and len(r.history) == 1
    ck = torch.load(tmp_path / "last.pt", weights_only=False)
    assert ck["planned_epochs"] == 1 and ck["train_cpu_s"] > 0


def test_progress_log_is_json_lines_with_the_documented_events(tmp_path):
    cfg = TrainConfig(**{**TINY, "epochs": 2})
    train(cfg, [], [], out_dir=tmp_path, slices=CachedSlices(synth_slices(), synth_slices(2, seed=1)))
    recs = [json.loads(line) for line in (tmp_path / "progress.jsonl").read_text().splitlines()]
    assert {r["event"] for r in recs} == {"step", "epoch", "done"}
    for r in recs:
        assert {"event", "epoch", "step", "loss", "eta_s", "time"} <= set(r)
    epochs = [r for r in recs if r["event"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [1, 2] and all("lr" in r and r["val"]["dice"] for r in epochs)
    assert recs[-1]["event"] == "done" and recs[-1]["package"]
    pkg = read_package(recs[-1]["package"])
    assert pkg.manifest["metrics"]["validation"]["mean_dice_fg"] is not None
    assert (tmp_path / "learning_curves.png").stat().st_size > 1000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_ddp_run_completes(tmp_path):
    data = tmp_path / "data"
    ids = write_synthetic_dataset(data, n_cases=4)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for attempt in range(2):
        # the free port is closed again before torchrun binds it, so another process can take it in
        # between: only that (the rendezvous port in use) earns one more try, on a new port and folder
        run_out = out if attempt == 0 else tmp_path / "run-again"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), "-m", "LumbarSegmentLib.training.cli", "train", "--data", str(data),
               "--val-cases", ids[-1], "--variant", "UD", "--init-filters", "4", "--epochs", "2",
               "--steps-per-epoch", "2", "--batch-size", "2", "--patch", "32", "--threads", "1", "--out", str(run_out)]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        said = (p.stdout + p.stderr).lower()
        # one more try also when a rank aborted in PyTorch's own teardown after the run had finished (gloo's
        # threads on a loaded machine: "terminate called without an active exception" once the package was written)
        teardown = "terminate called without an active exception" in said and (run_out / "package").is_dir()
        if p.returncode == 0 or not ("address already in use" in said or teardown):
            break
    out = run_out
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    pkg = read_package(out / "package")
    assert pkg.manifest["training"]["world_size"] == 2
    recs = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    assert recs[-1]["event"] == "done" and recs[-1]["epoch"] == 2


# --------------------------------------------------------------------------------------
def _tiny_package(folder: Path, name="tiny", schema=STARTER, bias=None) -> "ModelPackage":  # noqa: F821
    torch.manual_seed(0)
    m = build_model("UD", num_classes=schema.num_classes, init_filters=4)
    if bias is not None:  # a model that predicts one class everywhere
        with torch.no_grad():
            m.head.weight.zero_()
            m.head.bias.copy_(torch.tensor(bias, dtype=torch.float32))
    return write_package(folder, m, name=name, schema=schema, training={"train_cases": [], "val_cases": []})


def _schema_with_canal(reorder=False) -> LabelSchema:
    d = STARTER.to_dict()
    d["name"] = "starter_plus"
    d["classes"].append({"value": 3, "id": "spinal_canal", "name": "Spinal canal", "color": [244, 214, 49]})
    if reorder:  # disc before body, so rows must be mapped by id, not position
        d["classes"] = [d["classes"][0], d["classes"][2], d["classes"][1], d["classes"][3]]
        d["classes"][1]["value"], d["classes"][2]["value"] = 1, 2
    return LabelSchema.from_dict(d)


@pytest.mark.parametrize("reorder", [False, True])
def test_finetune_with_an_added_class_keeps_the_body(tmp_path, reorder):
    pkg = _tiny_package(tmp_path / "src")
    src = pkg.load_model()
    target = _schema_with_canal(reorder)
    model, target, info = prepare_finetune_model(pkg, target)
    assert info["new_classes"] == ["spinal_canal"] and info["heads_replaced"]
    heads = set(model.head_modules())
    src_state, new_state = src.state_dict(), model.state_dict()
    body = [k for k in src_state if k.rpartition(".")[0] not in heads]
    assert len(body) > 20
    for k in body:
        assert torch.equal(src_state[k], new_state[k]), k
    assert model.head.out_channels == 4 and model.builder_args["num_classes"] == 4
    src_ch = STARTER.channel_of()
    for name, conv in model.head_modules().items():
        old = src.get_submodule(name)
        for t, cid in enumerate(target.ids):
            if cid in src_ch:
                assert torch.equal(conv.weight[t], old.weight[src_ch[cid]]), (name, cid)
                assert torch.equal(conv.bias[t], old.bias[src_ch[cid]]), (name, cid)
    # and it trains end to end into a package with the new schema
    r = finetune(pkg, [], [], out_dir=tmp_path / "ft", schema=target,
                 config=TrainConfig(**{**TINY, "epochs": 1}),
                 slices=CachedSlices(synth_slices(schema=target), synth_slices(2, seed=1, schema=target)))
    assert r.package.schema.ids == target.ids
    assert r.package.manifest["training"]["init_from"]["kept_classes"] == [c for c in target.ids
                                                                            if c != "spinal_canal"]


def test_publish_only_if_at_least_as_good(tmp_path):
    data = tmp_path / "data"
    write_synthetic_dataset(data, n_cases=2, size=40)
    frozen = list_cases(data)
    reg = Registry(tmp_path / "registry")
    good = _tiny_package(tmp_path / "good", "good", bias=[0.0, 0.0, 10.0])  # "disc everywhere": some overlap
    bad = _tiny_package(tmp_path / "bad", "bad", bias=[10.0, 0.0, 0.0])  # background everywhere: Dice 0
    r = publish_if_better(good, reg, cases=frozen)
    assert r["default"] and reg.default_ref() == "good@1"
    r = publish_if_better(bad, reg, cases=frozen)
    assert not r["default"] and reg.default_ref() == "good@1"
    assert r["comparison"]["candidate"] < r["comparison"]["current"]
    r = publish_if_better(bad, reg, GatePolicy(force=True), cases=frozen)
    assert r["default"] and reg.default_ref() == "bad@2"
    r = publish_if_better(good, reg, cases=frozen, ensemble=["@new", "bad@2"])
    assert r["default"] and reg.default_ref() == "good@2" and reg.ensemble_refs() == ["good@2", "bad@2"]
    # old versions stay
    assert sorted(p.ref for p in reg.packages()) == ["bad@1", "bad@2", "good@1", "good@2"]
    # without data, packages with no common recorded validation cannot be compared
    from LumbarSegmentLib.registry.package import PackageError

    with pytest.raises(PackageError, match="--data"):
        publish_if_better(bad, reg)
    assert reg.default_ref() == "good@2"


def test_cli_train_evaluate_publish_export_cv(tmp_path, capsys, monkeypatch):
    from LumbarSegmentLib.training.cli import main

    data = tmp_path / "data"
    ids = write_synthetic_dataset(data, n_cases=4)
    out = tmp_path / "run"
    common = ["--variant", "UD", "--init-filters", "4", "--epochs", "2", "--steps-per-epoch", "2",
              "--batch-size", "2", "--patch", "32", "--lr", "3e-3"]
    assert main(["train", "--data", str(data), "--val-cases", f"{ids[2]},{ids[3]}", *common,
                 "--out", str(out)]) == 0
    pkg = read_package(out / "package")
    tr = pkg.manifest["training"]
    assert tr["val_cases"] == [ids[2], ids[3]] and len(tr["data_manifest"]) == 4
    assert len(tr["data_manifest_sha256"]) == 64 and tr["epochs"] == 2
    assert pkg.manifest["weights"]["dtype"] == "float16"
    assert main(["evaluate", "--model", str(out / "package"), "--data", str(data), "--out", str(tmp_path / "ev")]) == 0
    text = (tmp_path / "ev" / "metrics.md").read_text()
    assert "Vertebral body" in text and ids[2] in text
    assert "## Surface Dice" in text and "within 2 mm" in text  # the border-distance table, through the same run
    # coarse stacks: 2 mm slabs (the synthetic cases are thin) of 1.6 mm pixels; --inplane alone is refused with a message
    from LumbarSegmentLib.training import evaluate as ev

    seen = []
    real_prepare = ev.prepare_cases

    def spy(*args, **kw):
        cases = real_prepare(*args, **kw)
        seen.extend(c.image.spacing for c in cases)
        return cases

    monkeypatch.setattr(ev, "prepare_cases", spy)
    assert main(["evaluate", "--model", str(out / "package"), "--data", str(data), "--thick-slab", "2",
                 "--inplane", "1.6"]) == 0
    assert seen and all(sorted(sp)[:2] == pytest.approx([1.6, 1.6], abs=0.1) for sp in seen), seen
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out / "package"), "--data", str(data), "--inplane", "1.6"]) != 0
    assert "--thick-slab" in capsys.readouterr().err
    reg = tmp_path / "reg"
    assert main(["holdout", "--data", str(data), "--assign"]) == 0  # publish only reads the frozen split
    assert main(["publish", str(out / "package"), "--registry", str(reg), "--data", str(data)]) == 0
    assert Registry(reg).default_ref() == "ud-starter@1"
    assert main(["export", str(out / "best.pt"), "--out", str(tmp_path / "exp"), "--name", "exported"]) == 0
    exported = read_package(tmp_path / "exp")
    assert exported.name == "exported"
    # the run's provenance travels with any of its checkpoints
    assert exported.manifest["training"]["data_manifest_sha256"] == tr["data_manifest_sha256"]
    assert exported.manifest["training"]["checkpoint"] == "best.pt"
    assert main(["cv", "--data", str(data), "--folds", "2", *common[:-2], "--epochs", "1",
                 "--out", str(tmp_path / "cv")]) == 0
    folds = json.loads((tmp_path / "cv" / "folds.json").read_text())
    assert sorted(sum((f["val"] for f in folds.values()), [])) == sorted(ids)
    assert "pooled" in (tmp_path / "cv" / "cv_summary.md").read_text()
    assert main(["train", "--data", str(data), "--val-cases", "nope", *common, "--out", str(tmp_path / "x")]) == 2


def test_geometric_augmentation_ranges_from_the_command_line(capsys):
    """--zoom, --rotation and --augment-share reach the run's config (and so its manifest); bad ranges are refused by
    argparse with the reason, before anything runs; left out, the seed's ranges stay."""
    from LumbarSegmentLib.training.cli import build_parser
    from LumbarSegmentLib.training.config import config_from_args

    p = build_parser()
    a = p.parse_args(["train", "--data", "d", "--out", "o", "--zoom", "0.85,1.2", "--rotation", "10",
                      "--augment-share", "0.5"])
    cfg = config_from_args(a)
    assert cfg.zoom == (0.85, 1.2) and cfg.rotation_deg == 10.0 and cfg.augment_p == 0.5
    seed = config_from_args(p.parse_args(["finetune", "--from", "m", "--data", "d", "--out", "o"]))
    assert seed.zoom == (0.5, 1.5) and seed.rotation_deg == 20.0 and seed.augment_p == 1.0
    for bad, why in ((["--zoom", "1.2,0.8"], "LO <= HI"), (["--zoom", "1"], "two numbers"),
                     (["--rotation", "400"], "0-180"), (["--rotation", "x"], "not a number of degrees"),
                     (["--augment-share", "1.5"], "use 0 (no patch augmented) to 1"),
                     (["--augment-share", "half"], "'half' is not a share"),
                     (["--slab-aug", "2"], "use a probability from 0 to 1"),
                     (["--resolution-aug", "x"], "'x' is not a probability")):
        with pytest.raises(SystemExit) as e:
            p.parse_args(["train", "--data", "d", "--out", "o", *bad])
        assert e.value.code == 2 and why in capsys.readouterr().err
