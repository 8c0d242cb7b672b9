"""``lumbarseg-train guidance``: train a click-guided model from a drafting package, resumable, with a
time budget, and write it as a model package whose manifest declares its click maps.

    lumbarseg-train guidance --from uvd-starter@5 --registry Resources/Models --data DATA[,DATA2] \\
        --exclude TEST,VAL --steps 2000 --max-minutes 40 --out runs/guide

The run folder holds ``guidance.pt`` (weights, optimiser, step: ``--resume`` continues it) and, at the
end, ``package/`` (the model package). The package is a drafting model too (with no clicks it
drafts as its parent did, plus what training changed), so the publish gate can grade it like any
other; ``--from`` a guidance package continues its training (a fine-tune on new corrections).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from LumbarSegmentLib.core.guidance import GuidanceSpec
from LumbarSegmentLib.registry.package import PackageInfo, default_input_contract, write_package

from .guidance import Budget, ClickSetup, ClickSim, guided_model, simulate

log = logging.getLogger("lumbarseg.train")


def add_parser(sub) -> None:
    g = sub.add_parser("guidance", help="train a click-guided model (click maps as extra inputs) from a package")
    g.add_argument("--from", dest="source", required=True, help="drafting (or guidance) package: name@version or folder")
    g.add_argument("--registry", default=None, help="registry folder that holds --from")
    g.add_argument("--data", required=True, help="dataset folder(s), comma-separated")
    g.add_argument("--cases", default=None, help="only these case ids (comma-separated)")
    g.add_argument("--exclude", default=None, help="leave out these case ids (comma-separated): test and validation")
    g.add_argument("--steps", type=int, default=2000)
    g.add_argument("--batch-size", type=int, default=4)
    g.add_argument("--patch", type=int, default=192)
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--max-clicks", type=int, default=4)
    g.add_argument("--radius-mm", type=float, default=3.0)
    g.add_argument("--reach-mm", type=float, default=4.0)
    g.add_argument("--prior", action="store_true",
                   help="the model also reads the current label map (a mask per structure): it corrects, not drafts")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget; the run stops and saves")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--name", default="uvd-guide")
    g.add_argument("--out", required=True, help="run folder (new, or with --resume the one to continue)")
    g.add_argument("--resume", action="store_true")
    g.set_defaults(func=cmd_guidance)


def _cases(a):
    from LumbarSegmentLib.training.data import select_cases

    ids = [s for s in (a.cases or "").split(",") if s] or None
    exclude = [s for s in (a.exclude or "").split(",") if s]
    return select_cases(a.data, ids, exclude)


def cmd_guidance(a) -> int:
    from LumbarSegmentLib.registry.catalog import resolve_model
    from LumbarSegmentLib.registry.registry import Registry

    out = Path(a.out)
    if out.exists() and any(out.iterdir()) and not a.resume:
        raise SystemExit(f"{out} exists and is not empty; give a new --out, or --resume to continue that run")
    parent = resolve_model(a.source, [Registry(a.registry)] if a.registry else None)
    out.mkdir(parents=True, exist_ok=True)
    pkg = train(parent, _cases(a), a, out)
    print(f"guidance model written: {pkg.path} ({pkg.ref})")
    return 0


def _start(parent, spec: GuidanceSpec):
    from LumbarSegmentLib.inference.runners import LoadedModel

    loaded = LoadedModel.from_package(parent)
    if loaded.guidance is not None:  # continue a guidance model; its drafts come from its own parent
        if loaded.guidance != spec:
            raise SystemExit(f"{parent.ref} reads {loaded.guidance.to_dict()}, not {spec.to_dict()}")
        return loaded.module, _drafter_of(parent)
    return guided_model(loaded.module, spec), loaded.module.eval()


def _drafter_of(package):
    """The drafting model a guidance package was trained from (its parent), to draft the priors."""
    from LumbarSegmentLib.inference.runners import LoadedModel
    from LumbarSegmentLib.registry.catalog import resolve_model

    ref = (package.manifest.get("parent") or {}).get("ref")
    if not ref:
        raise SystemExit(f"{package.ref} does not name the drafting model it was trained from (manifest 'parent')")
    return LoadedModel.from_package(resolve_model(ref)).module.eval()


def train(parent, cases, a, out: Path):
    from LumbarSegmentLib.inference.devices import autocast, autocast_dtype, pick_device, precision_name

    from . import augment as aug
    from .data import PatchSampler, data_manifest, epoch_generator, load_dataset
    from .losses import deep_supervision_loss
    from .optim import lr_factor

    if a.threads:
        torch.set_num_threads(int(a.threads))
    schema = parent.schema
    spec = GuidanceSpec.for_classes(schema.ids, a.radius_mm, a.reach_mm, prior=getattr(a, "prior", False))
    model, drafter = _start(parent, spec)
    device = pick_device("auto")
    model.to(device).train()
    drafter.to(device)
    dtype = autocast_dtype(device, a.precision)
    data = load_dataset(cases, schema, parent.spacing)
    sampler = PatchSampler(data, patch=a.patch, fg_fraction=0.9, balance="sources")
    cfg = aug.AugmentConfig(intensity="domain")
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    ckpt, step = out / "guidance.pt", 0
    if a.resume and ckpt.is_file():
        st = torch.load(ckpt, map_location="cpu", weights_only=True)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step = int(st["step"])
        log.info("resumed at step %d", step)
    setup = ClickSetup(spec, ClickSim(max_clicks=a.max_clicks), a.radius_mm / float(parent.spacing[0]), tuple(schema.ids))
    budget = Budget(a.max_minutes)
    running = None
    while step < a.steps and not budget.over():
        for g in opt.param_groups:
            g["lr"] = a.lr * lr_factor(step, a.steps, min(50, a.steps // 10), "cosine", 0.01)
        gen = epoch_generator(a.seed, step)
        img, lab, ann = sampler.sample(a.batch_size, gen)
        x, y = aug.augment_batch(img, lab, cfg, a.patch, gen, device)
        ann = ann.to(device)
        maps = simulate(model, drafter, x, y, ann, setup, gen, dtype)
        with autocast(device, dtype):
            outp = model(torch.cat([x, maps], 1))
            loss = deep_supervision_loss(outp, y, ann, unannotated_bg_weight=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        lv = float(loss.detach())
        running = lv if running is None else 0.95 * running + 0.05 * lv
        if step % 25 == 0:
            log.info("step %d/%d loss %.4f", step, a.steps, running)
        if step % 200 == 0:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, ckpt)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, ckpt)
    contract = dict(default_input_contract(parent.spacing, (a.patch, a.patch)))
    contract["guidance"] = spec.to_dict()
    contract["channels"] = contract["channels"] + spec.channels
    training = {"kind": "click-guidance", "steps": step, "batch_size": a.batch_size, "patch": a.patch, "lr": a.lr,
                "max_clicks": a.max_clicks, "precision": precision_name(dtype), "command": getattr(a, "command", None),
                "synthetic_p": setup.sim.synthetic_p if spec.prior else 0.0,
                "init_from": {"package": parent.ref, "weights_sha256": parent.sha256},
                "data_manifest": data_manifest(cases)["cases"], "train_cases": [c.case_id for c in cases]}
    target = out / "package"
    if target.exists():
        import shutil

        shutil.rmtree(target)
    model.eval()
    return write_package(target, model.cpu(), PackageInfo(name=a.name, schema=schema, input_contract=contract,
                                                          training=training))


def build_standalone_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lumbarseg-train")
    add_parser(p.add_subparsers(dest="command", required=True))
    return p
