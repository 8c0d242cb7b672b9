"""Spread a cohort over processes started by ``torchrun``: one device per rank, each case once.

    torchrun --nproc-per-node 4 -m LumbarSegmentLib.cli.main segment COHORT -o OUT
    torchrun --nnodes 2 --node-rank R --nproc-per-node 8 --rdzv-backend c10d \\
             --rdzv-endpoint HOST:29500 -m LumbarSegmentLib.cli.main segment COHORT -o OUT

Why static sharding: inference of one case needs no other rank, so the only coordination needed is
"who does which case" and "who writes the summary". Every rank expands the same inputs into the same
sorted list (:func:`LumbarSegmentLib.cli.cohort.expand_inputs`) and takes every ``world``-th case starting at
its rank, so no case is done twice and none is skipped, without a queue or shared state. OUT must be
the same shared folder on every node (each case's files are still written under a temporary name and
renamed, so a reader never sees half a file).

Devices: a rank on a CUDA machine uses ``cuda:LOCAL_RANK`` (one GPU per process, as torchrun intends);
on CPU the cores are split between the ranks of a node so they do not oversubscribe them.

The process group (gloo: it carries Python objects between CPU and GPU ranks alike) is used for one
thing at the end: gathering every rank's per-case rows so that rank 0 writes the cohort summary.
Its timeout is long (``LUMBARSEG_DIST_TIMEOUT_MIN``, default 24 h) because ranks may finish their
shards hours apart.
"""
from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Rank:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def tag(self) -> str:
        return f"[rank {self.rank}/{self.world}] " if self.distributed else ""


def current_rank(env=None) -> Rank:
    """This process's place, from the variables torchrun sets (a plain run is rank 0 of 1)."""
    env = os.environ if env is None else env
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", "0"))
        local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    except ValueError as exc:
        raise ValueError(f"malformed torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {exc}") from None
    if world < 1 or not 0 <= rank < world or not 0 <= local_rank < max(local_world, 1):
        raise ValueError(f"inconsistent torchrun environment: RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local_rank}")
    return Rank(rank, world, local_rank, max(local_world, 1))


def shard(items: list, me: Rank) -> list:
    """This rank's cases: every ``world``-th item from index ``rank`` (balanced to within one case)."""
    return list(items[me.rank::me.world])


def device_for(me: Rank, requested: str) -> str:
    """``cuda:LOCAL_RANK`` for a distributed run that may use CUDA; otherwise the requested device."""
    if not me.distributed or requested not in ("auto", "cuda"):
        return requested
    import torch

    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        if me.local_rank >= n:
            raise ValueError(f"rank {me.rank}: LOCAL_RANK {me.local_rank} but this node has {n} GPU(s); start "
                             f"at most {n} processes per node (--nproc-per-node)")
        torch.cuda.set_device(me.local_rank)
        return f"cuda:{me.local_rank}"
    return requested


def threads_for(me: Rank, requested: int | None) -> int | None:
    """CPU threads per rank: the node's cores split between its ranks, unless set explicitly."""
    if requested is not None or not me.distributed:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // me.local_world)


def init(me: Rank) -> None:
    """Join the process group (fails fast when the rendezvous is broken, before any inference)."""
    if not me.distributed:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        minutes = float(os.environ.get("LUMBARSEG_DIST_TIMEOUT_MIN", 24 * 60))
        dist.init_process_group("gloo", timeout=_dt.timedelta(minutes=minutes))


def gather_rows(me: Rank, rows: list[dict]) -> list[dict] | None:
    """Every rank's rows on rank 0 (``None`` on the others); a plain run returns its own rows."""
    if not me.distributed:
        return rows
    import torch.distributed as dist

    out = [None] * me.world if me.rank == 0 else None
    dist.gather_object(rows, out, dst=0)
    return [r for part in out for r in part] if me.rank == 0 else None


def barrier(me: Rank) -> None:
    """Wait for every rank (nothing to wait for in a plain run)."""
    if me.distributed:
        import torch.distributed as dist

        dist.barrier()


def finish(me: Rank) -> None:
    if me.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
