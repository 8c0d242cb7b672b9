"""Neural network models for lumbar-spine MR segmentation (pure PyTorch).

See ``docs/models.md`` for a description of the variants and blocks.
"""

from .variants import (
    VARIANTS,
    SegmentationNet,
    VariantSpec,
    build_model,
    count_parameters,
    replace_heads,
    widen_input,
)

__all__ = [
    "VARIANTS",
    "VariantSpec",
    "SegmentationNet",
    "build_model",
    "replace_heads",
    "widen_input",
    "count_parameters",
]
