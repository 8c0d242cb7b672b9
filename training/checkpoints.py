"""Training checkpoints: written atomically, read back with ``weights_only=True``.

A checkpoint holds tensors and plain data only (model, optimiser, scheduler and every RNG's
state, the epoch, the history), so loading one can never run code, and a killed run resumes
exactly where its last completed epoch left it.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_FORMAT = "lumbarsegment.checkpoint"


def plain(obj):
    """``obj`` with numpy values turned into tensors and Python numbers: what ``weights_only=True`` loads."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def load_checkpoint(path: Path) -> dict:
    """A checkpoint this code wrote, read with ``weights_only=True``: tensors and plain data only, no code.

    A file holding anything else (a pickle made to run code, a foreign checkpoint) is refused
    before any of its objects is built.
    """
    try:
        ck = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, ... by torch version
        raise ValueError(f"{path}: not a LumbarSegment training checkpoint, or one holding more than tensors and "
                         f"plain data ({type(exc).__name__}); refused without running anything from it. Start "
                         f"the run in a new --out folder") from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a LumbarSegment training checkpoint")
    return ck


def atomic_torch_save(obj, path: Path) -> None:
    obj = plain(obj)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    """Every RNG's state as tensors and plain numbers, so a checkpoint loads with ``weights_only=True``."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, py_gauss = random.getstate()
    st = {"torch": torch.get_rng_state(),
          "numpy": [str(name), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss),
                    float(gauss)],
          "python": [int(version), torch.tensor(internal, dtype=torch.int64), py_gauss]}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    name, keys, pos, has_gauss, gauss = st["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss))
    version, internal, py_gauss = st["python"]
    random.setstate((version, tuple(int(v) for v in internal.tolist()), py_gauss))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


__all__ = ["CHECKPOINT_FORMAT", "plain", "load_checkpoint", "atomic_torch_save", "rng_state", "set_rng_state",
           "seed_everything"]
