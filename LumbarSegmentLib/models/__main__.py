"""Command-line summary of the model family.

    python -m LumbarSegmentLib.models --table

prints a Markdown table with each variant's architecture switches, training
defaults, parameter count and GFLOPs for one slice (eval-mode forward, so
deep-supervision heads are not counted).  FLOPs are counted with
``torch.utils.flop_counter.FlopCounterMode`` (2 x multiply-adds of convs and
matmuls; BN, activations, pooling and interpolation are not counted) on the
``meta`` device, so nothing is actually computed and the command is fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from .variants import VARIANTS, build_model, count_parameters

#: (label, build_model kwargs) of the extra "starter" rows.
STARTER_ROWS = (
    ("UVD (starter)", {"variant": "UVD", "num_classes": 3, "init_filters": 16}),
    ("UMD (starter)", {"variant": "UMD", "num_classes": 3, "init_filters": 16}),
)


def measure(kwargs: Dict, size: int = 256) -> Dict:
    """Parameter count and GFLOPs of one ``1 x C x size x size`` eval forward."""
    with torch.device("meta"):
        model = build_model(**kwargs).eval()
        x = torch.empty(1, model.in_channels, size, size)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return {"model": model, "params": count_parameters(model),
            "gflops": counter.get_total_flops() / 1e9}


def table_rows(size: int = 256, num_classes: int = 12, in_channels: int = 1) -> List[List[str]]:
    rows = []
    entries = [(name, {"variant": name, "num_classes": num_classes, "in_channels": in_channels})
               for name in VARIANTS]
    entries += [(label, dict(kw, in_channels=in_channels)) for label, kw in STARTER_ROWS]
    for label, kwargs in entries:
        m = measure(kwargs, size)
        spec = m["model"].spec
        rows.append([
            label,
            "fcn8 (vgg16)" if spec.fcn8 else spec.encoder,
            spec.block,
            "yes" if spec.attention else "no",
            "yes" if spec.deep_supervision else "no",
            spec.optimizer,
            f"{spec.lr:g}",
            spec.activation,
            str(spec.init_filters),
            str(m["model"].num_classes),
            f"{m['params']:,}",
            f"{m['gflops']:.2f}",
        ])
    return rows


def markdown_table(size: int = 256) -> str:
    header = ["Variant", "Encoder", "Block", "Attention", "DS", "Optimiser", "LR",
              "Activation", "Init filters", "Classes", "Params", f"GFLOPs ({size}x{size})"]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i < 8 else "--:" for i in range(len(header))) + "|"]
    for row in table_rows(size):
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m LumbarSegmentLib.models",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true",
                        help="print the Markdown parameter/GFLOP table")
    parser.add_argument("--size", type=int, default=256,
                        help="slice size (pixels) for the GFLOP count (default 256)")
    args = parser.parse_args(argv)
    if not args.table:
        parser.print_help()
        return 0
    print(markdown_table(args.size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
