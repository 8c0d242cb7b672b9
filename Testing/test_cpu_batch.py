"""Windows per CPU batch follow the window size, so one batch's activations stay bounded."""
from __future__ import annotations

import torch

from LumbarSegmentLib.inference import runners
from LumbarSegmentLib.inference.options import SegmentOptions


def test_cpu_batch_holds_a_fixed_number_of_pixels(tiny_package):
    spec = runners.LoadedModel.from_package(tiny_package)
    opts = SegmentOptions(device="cpu")
    sizes = {plane: runners.cpu_batch(torch.zeros(3, *plane), spec, opts) for plane in [(300, 300), (381, 381),
                                                                                         (600, 600)]}
    assert sizes[(300, 300)] == 4  # whole 320 x 320 windows
    assert sizes[(381, 381)] == 2  # whole 384 x 384 windows
    assert sizes[(600, 600)] >= 1
    runner = runners.Runner(spec, torch.device("cpu"), opts, [], torch.zeros(3, 381, 381), lambda: False)
    assert runner.batch == runner.group == 2
    fixed = runners.Runner(spec, torch.device("cpu"), SegmentOptions(device="cpu", batch_size=7), [],
                            torch.zeros(3, 381, 381), lambda: False)
    assert fixed.batch == 7  # an explicit --batch-size is kept
