"""Building a saved network from its recorded architecture, checked before any memory is spent.

A package's ``manifest.json`` ``architecture`` and a checkpoint's ``builder_args`` are read from
files a user may have been sent (or edited and re-sealed). Passing them straight to
``build_model(**args)`` turns an unknown key into a ``TypeError`` traceback, and a huge
``init_filters`` into a multi-GB network that is only then found not to fit the weights. So:

* the keys must be ones ``build_model`` takes; an unknown one is one line naming the file and the key;
* the network is first built on PyTorch's ``meta`` device (shapes only, no memory) and every tensor's
  shape is compared with the stored weights' shapes (read from the file's header, not its data);
* only then is the real network built.

Every problem is raised as :class:`ArchitectureError` (a ``ValueError``), naming where it came from.
"""
from __future__ import annotations

import inspect


class ArchitectureError(ValueError):
    """A recorded architecture that cannot be built, or does not fit its weights."""


def builder_keys() -> list[str]:
    from .variants import build_model

    return [p for p in inspect.signature(build_model).parameters]


def check_keys(args, where: str) -> dict:
    """``args`` as a dict of keys ``build_model`` takes; else one line naming ``where`` and the keys."""
    if not isinstance(args, dict):
        raise ArchitectureError(f"{where}: the architecture must be an object, got {type(args).__name__}")
    known = builder_keys()
    unknown = sorted(k for k in args if k not in known)
    if unknown:
        raise ArchitectureError(f"{where}: unknown architecture key(s) {unknown} (this version knows "
                                f"{', '.join(known)}); it was made by a newer LumbarSegment or edited by hand: "
                                f"update LumbarSegment, or export the model again")
    return args


def _build(args: dict, where: str):
    from .variants import build_model

    try:
        return build_model(**args)
    except (TypeError, ValueError) as exc:
        raise ArchitectureError(f"{where}: the architecture cannot be built: {exc}") from None


def check_shapes(args: dict, shapes: dict[str, tuple], where: str) -> None:
    """Refuse weights whose tensor names or shapes differ from the network's, before building it for real."""
    import torch

    from .variants import shapes_only

    with torch.device("meta"), shapes_only():
        skeleton = _build(args, where)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = [k for k in expected if k in shapes and tuple(shapes[k]) != expected[k]]
    if missing or unexpected or wrong:
        detail = (f"{wrong[0]} is {tuple(shapes[wrong[0]])} in the weights but {expected[wrong[0]]} in the "
                  f"architecture" if wrong else f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        raise ArchitectureError(f"{where}: the weights do not fit the recorded architecture ({detail}); the "
                                f"manifest or the weights were changed. Reinstall or export the model again")


def safetensors_shapes(path) -> dict[str, tuple]:
    """Tensor name -> shape from a safetensors file's header (no tensor data is read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def build_checked(args, where: str, shapes: dict[str, tuple] | None = None):
    """The network of ``args``, after the key and (when ``shapes`` is given) weight-shape checks."""
    args = check_keys(args, where)
    if shapes is not None:
        check_shapes(args, shapes, where)
    return _build(args, where)
