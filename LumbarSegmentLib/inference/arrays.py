"""The array arithmetic of the prediction path, on PyTorch tensors or on NumPy arrays.

Why two libraries: everything the engine does around the network (padding and cutting windows,
flips, blending, resampling, the across-slice average, argmax, the tally) is plain array arithmetic.
When OpenVINO or ONNX Runtime computes the network, doing that arithmetic in NumPy means the process
never imports PyTorch, which is over a second and about 400 MB of every cold command on a CPU
(docs/benchmarks.md). The steps are written once; the arrays they are handed choose the library:
a tensor stays in PyTorch (the same kernels as ever), a NumPy array stays in NumPy.

:func:`ops` returns the operations for an array; both sets have the same methods and the same
meaning. NumPy runs in float32 like PyTorch, so the two agree to the last bit or two.
"""
from __future__ import annotations

import numpy as np


class NumpyOps:
    """The operations on NumPy arrays (float32, C order)."""

    name = "numpy"

    @staticmethod
    def zeros(shape) -> np.ndarray:
        return np.zeros(shape, np.float32)

    @staticmethod
    def ones(shape) -> np.ndarray:
        return np.ones(shape, np.float32)

    @staticmethod
    def empty(shape) -> np.ndarray:
        return np.empty(shape, np.float32)

    @staticmethod
    def gaussian(n: int, sigma: float) -> np.ndarray:
        x = np.arange(n, dtype=np.float32) - np.float32((n - 1) / 2)
        return np.exp(np.float32(-0.5) * (x / np.float32(sigma)) ** 2)

    @staticmethod
    def clamp_min(x, lo: float):
        return np.maximum(x, np.float32(lo))

    @staticmethod
    def pad_hw(x, pad_h: int, pad_w: int):
        """Zeros appended below and to the right of the last two axes."""
        return np.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, pad_h), (0, pad_w)])

    @staticmethod
    def stack(items) -> np.ndarray:
        return np.stack(items)

    @staticmethod
    def cat_channels(x, extra: int):
        """``x`` [B, C, H, W] with ``extra`` empty channels appended (a click-guided model drafting)."""
        return np.concatenate([x, np.zeros((x.shape[0], extra) + x.shape[2:], x.dtype)], 1)

    @staticmethod
    def flip_w(x):
        return x[..., ::-1]

    @staticmethod
    def take_slices(stack, index: np.ndarray):
        return stack[index]

    @staticmethod
    def broadcast(x, shape):
        return np.broadcast_to(x, shape)

    @staticmethod
    def assign(dst, src) -> None:
        dst[...] = src

    @staticmethod
    def add_scaled(dst, src, weight: float) -> None:
        """``dst += weight * src``, in place, a slice at a time (the product stays in the CPU's cache:
        three times faster than one whole-block temporary)."""
        w = np.float32(weight)
        src = np.broadcast_to(src, dst.shape)
        for i in range(dst.shape[0]):
            dst[i] += src[i] * w

    @staticmethod
    def channel_max(probs) -> tuple[np.ndarray, np.ndarray]:
        """``(max, argmax)`` over the channels of ``[n, K, H, W]``; a tie goes to the first channel.
        One pass over contiguous planes: twice as fast as NumPy's ``max`` and ``argmax`` along axis 1."""
        best = probs[:, 0].copy()
        arg = np.zeros(best.shape, np.intp)
        for k in range(1, probs.shape[1]):
            arg[probs[:, k] > best] = k
            np.maximum(best, probs[:, k], out=best)
        return best, arg

    @staticmethod
    def entropy_sum(probs, mask: np.ndarray) -> float:
        """Summed entropy of the voxels in ``mask`` [n, H, W] of ``probs`` [n, K, H, W] (the foreground:
        a few per cent of the voxels, so only those are gathered; ``probs`` is left as it is)."""
        p = np.maximum(np.moveaxis(probs, 1, -1)[mask], np.float32(1e-8))
        return float(-(p * np.log(p)).sum())


class TorchOps:
    """The same operations on PyTorch tensors (CPU, float32)."""

    name = "torch"

    @staticmethod
    def zeros(shape):
        import torch

        return torch.zeros(shape)

    @staticmethod
    def ones(shape):
        import torch

        return torch.ones(shape)

    @staticmethod
    def empty(shape):
        import torch

        return torch.empty(shape)

    @staticmethod
    def gaussian(n: int, sigma: float):
        import torch

        x = torch.arange(n, dtype=torch.float32) - (n - 1) / 2
        return torch.exp(-0.5 * (x / sigma) ** 2)

    @staticmethod
    def clamp_min(x, lo: float):
        return x.clamp_min(lo)

    @staticmethod
    def pad_hw(x, pad_h: int, pad_w: int):
        import torch.nn.functional as F

        return F.pad(x, (0, pad_w, 0, pad_h))

    @staticmethod
    def stack(items):
        import torch

        return torch.stack(items)

    @staticmethod
    def cat_channels(x, extra: int):
        import torch

        return torch.cat([x, x.new_zeros((x.shape[0], extra) + tuple(x.shape[2:]))], 1)

    @staticmethod
    def flip_w(x):
        import torch

        return torch.flip(x, dims=[x.dim() - 1])

    @staticmethod
    def take_slices(stack, index: np.ndarray):
        import torch

        return stack[torch.from_numpy(index)]

    @staticmethod
    def broadcast(x, shape):
        return x.expand(*shape)

    @staticmethod
    def assign(dst, src) -> None:
        dst.copy_(src)

    @staticmethod
    def add_scaled(dst, src, weight: float) -> None:
        dst.add_(src, alpha=weight)

    @staticmethod
    def channel_max(probs) -> tuple[np.ndarray, np.ndarray]:
        pmax, arg = probs.max(dim=1)
        return pmax.numpy(), arg.numpy()

    @staticmethod
    def entropy_sum(probs, mask: np.ndarray) -> float:
        """As NumPy's; here ``probs`` is clamped in place and the masked sum needs no boolean gather."""
        import torch

        p_safe = probs.clamp_min_(1e-8)  # masked sum: no boolean gather
        ent = (p_safe * p_safe.log()).sum(dim=1).neg_()
        return float(ent.mul_(torch.from_numpy(mask)).sum())


NUMPY, TORCH = NumpyOps(), TorchOps()


def ops(x) -> NumpyOps | TorchOps:
    """The operations for arrays like ``x``: NumPy for a NumPy array, PyTorch for anything else (a tensor)."""
    return NUMPY if isinstance(x, np.ndarray) else TORCH
