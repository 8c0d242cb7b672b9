"""Data-parallel training under ``torchrun``: which process this is, and the few collectives the loop needs.

``WORLD_SIZE`` > 1 in the environment turns it on: gloo on the CPU, NCCL on CUDA (rank i on
GPU i). Every process draws its own patches; rank 0 validates, logs and writes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup_distributed(device_name: str = "auto") -> DistInfo:
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return DistInfo()
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, initialised_here=True)


def broadcast_floats(values: list[float], dist_info: DistInfo, device) -> list[float]:
    if not dist_info.enabled:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return t.tolist()


def mean_across(value: float, dist_info: DistInfo, device) -> float:
    if not dist_info.enabled:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist_info.world


__all__ = ["DistInfo", "setup_distributed", "broadcast_floats", "mean_across"]
