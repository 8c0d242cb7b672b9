#!/usr/bin/env python
"""Does bf16 autocast help training on this CPU? Same init, same patches, fp32 vs bf16.

Trains a variant for ``--steps`` steps twice from the same initial weights on the same
sequence of augmented real patches (the trainer's sampler and augmentation), once in
float32 and once under ``torch.autocast("cpu", torch.bfloat16)``, and prints seconds per
step (median, after ``--warmup`` steps) and the loss curves (mean over windows).

    python scripts/bench_amp.py --variant UVD --steps 40 --patch 192 --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from LumbarSegmentLib.models import build_model  # noqa: E402
from LumbarSegmentLib.training import augment as aug  # noqa: E402
from LumbarSegmentLib.training.data import PatchSampler, epoch_generator, load_dataset, select_cases  # noqa: E402
from LumbarSegmentLib.inference.devices import autocast  # noqa: E402
from LumbarSegmentLib.training.losses import deep_supervision_loss  # noqa: E402


def run(variant, filters, data, steps, batch, patch, amp, lr, seed=0):
    torch.manual_seed(seed)
    model = build_model(variant, num_classes=3, init_filters=filters).train()
    opt = torch.optim.Adam(model.parameters(), lr)
    sampler = PatchSampler(data, patch)
    gen = epoch_generator(seed, 0)
    times, losses = [], []
    for _ in range(steps):
        img, lab, ann = sampler.sample(batch, gen)
        x, y = aug.augment_batch(img, lab, aug.AugmentConfig(), patch, gen)
        t0 = time.perf_counter()
        with autocast(torch.device("cpu"), torch.bfloat16 if amp == "bf16" else None):
            out = model(x)
        loss = deep_supervision_loss(out, y, ann)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
    return times, losses


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "lumbar-mr"))
    p.add_argument("--cases", default="IVD_11,VB2_02,VB1_07,VB3_01")
    p.add_argument("--variant", default="UVD")
    p.add_argument("--init-filters", type=int, default=16)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--patch", type=int, default=192)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    data = load_dataset(select_cases(a.data, a.cases.split(",")), "starter")
    res = {}
    for amp in ("off", "bf16"):
        res[amp] = run(a.variant, a.init_filters, data, a.steps, a.batch_size, a.patch, amp, a.lr)
    w = max(1, a.steps // 4)
    print(f"{a.variant} init_filters={a.init_filters} batch {a.batch_size}x{a.patch}^2, "
          f"{torch.get_num_threads()} threads, {a.steps} steps")
    print("| mode | s/step (median) | " + " | ".join(f"loss steps {i + 1}-{min(i + w, a.steps)}"
                                                  for i in range(0, a.steps, w)) + " |")
    print("|---|--:|" + "--:|" * len(range(0, a.steps, w)))
    for amp, (times, losses) in res.items():
        med = statistics.median(times[a.warmup:]) if len(times) > a.warmup else statistics.median(times)
        means = [statistics.mean(losses[i:i + w]) for i in range(0, a.steps, w)]
        print(f"| {'fp32' if amp == 'off' else 'bf16 autocast'} | {med:.2f} | "
              + " | ".join(f"{m:.4f}" for m in means) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
