"""The inference engine: geometry in = geometry out, storage-order invariance, modes, devices, cancel."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from LumbarSegmentLib.inference.devices import EngineError
from LumbarSegmentLib.inference.engine import SegmentOptions, segment_volume
from LumbarSegmentLib.inference.runners import Cancelled
from LumbarSegmentLib.inference.windows import gaussian_weight, window_starts
from LumbarSegmentLib.core.geometry import OrientationError, axis_codes
from LumbarSegmentLib.core.schema import LabelSchema, SchemaError, load_schema
from LumbarSegmentLib.core.volume import Volume, VolumeError
from conftest import make_package


def restore(volume: Volume, perm, flips) -> Volume:
    """The same image stored in another index order: numpy axes permuted/flipped, geometry adjusted
    so that every voxel keeps its physical position."""
    arr = volume.array
    # numpy axis a <-> index axis 2-a
    idx_perm = [2 - p for p in perm][::-1]  # new index axis n takes old index axis idx_perm[n]
    new = np.transpose(arr, perm)
    for ax, f in enumerate(flips):
        if f:
            new = np.flip(new, axis=ax)
    new = np.ascontiguousarray(new)
    d_old, sp_old = volume.direction, volume.spacing
    size_old = volume.size_ijk
    d = np.zeros((3, 3))
    sp = [0.0] * 3
    origin = np.array(volume.origin, dtype=float)
    for n in range(3):
        o = idx_perm[n]
        flipped = flips[2 - n]
        d[:, n] = d_old[:, o] * (-1 if flipped else 1)
        sp[n] = sp_old[o]
        if flipped:
            origin = origin + d_old[:, o] * sp_old[o] * (size_old[o] - 1)
    return Volume(new, spacing=sp, origin=origin, direction=d)


def test_window_starts_cover_and_blend():
    assert window_starts(200, 256, 0.25) == [0]
    s = window_starts(600, 256, 0.25)
    assert s[0] == 0 and s[-1] == 600 - 256 and all(b - a <= 192 for a, b in zip(s, s[1:]))
    w = gaussian_weight(64, 64)
    assert w.max() == 1 and w.min() > 0 and w[32, 32] > w[0, 0]


def test_output_on_exact_input_grid(small_real_volume, tiny_package):
    res = segment_volume(small_real_volume, [tiny_package], SegmentOptions(tile="patch", confidence=True))
    assert res.labels.array.shape == small_real_volume.array.shape
    assert res.labels.array.dtype == np.uint8
    assert res.labels.same_geometry(small_real_volume)
    assert set(np.unique(res.labels.array)) <= {0, 1, 2}
    assert res.confidence.same_geometry(small_real_volume)
    c = res.confidence.array
    assert c.min() >= 1 / 3 - 1e-4 and c.max() <= 1 + 1e-6  # max of 3 probabilities
    rep = res.report
    assert rep["labels"] == {"0": "background", "1": "vertebral_body", "2": "intervertebral_disc"}
    assert rep["models"][0]["sha256"] == tiny_package.sha256
    assert {"load_models", "preprocess", "inference", "total"} <= set(rep["timings_s"])
    assert rep["device"] == "cpu" and rep["torch"] == torch.__version__


@pytest.mark.parametrize("perm,flips", [((2, 1, 0), (False, True, False)),  # slice axis last
                                        ((1, 2, 0), (True, False, True)),
                                        ((0, 1, 2), (True, True, True))])
def test_storage_order_does_not_change_the_segmentation(small_real_volume, tiny_package, perm, flips):
    """The same anatomy stored LPS or e.g. PIR gives the same labels (up to the storage order)."""
    opts = SegmentOptions(precision="fp32")
    ref = segment_volume(small_real_volume, [tiny_package], opts).labels
    other = restore(small_real_volume, perm, flips)
    assert axis_codes(other.direction) != axis_codes(small_real_volume.direction) or any(flips)
    got = segment_volume(other, [tiny_package], opts).labels
    assert got.same_geometry(other)
    back = np.transpose(np.flip(got.array, axis=[a for a in range(3) if flips[a]]) if any(flips) else got.array,
                        np.argsort(perm))
    np.testing.assert_array_equal(back, ref.array)


def _permuted_twin(pkg, folder):
    """The same network with its output channels and schema classes in another order."""
    from LumbarSegmentLib.registry.package import write_package

    model = pkg.load_model()
    order = [0, 2, 1]
    with torch.no_grad():
        for head in model.head_modules().values():
            head.weight.copy_(head.weight[order].clone())
            head.bias.copy_(head.bias[order].clone())
    s = pkg.schema
    schema = LabelSchema(name="starter-reordered", classes=tuple(s.classes[i] for i in order))
    return write_package(folder, model, name="twin", schema=schema, half=False)


def test_channels_are_matched_by_class_id_not_position(small_real_volume, tiny_package, tmp_path):
    twin = _permuted_twin(tiny_package, tmp_path / "twin")
    assert twin.schema.ids != tiny_package.schema.ids
    opts = SegmentOptions(precision="fp32")
    a = segment_volume(small_real_volume, [tiny_package], opts)
    b = segment_volume(small_real_volume, [twin], opts)
    # the same structure gets the same label value, whatever the channel order
    agree = (a.labels.array == b.labels.array).mean()
    assert agree > 0.999
    ens = segment_volume(small_real_volume, [tiny_package, twin], SegmentOptions(mode="ensemble", precision="fp32"))
    assert (ens.labels.array == segment_volume(small_real_volume, [tiny_package],
                                               SegmentOptions(mode="tta", precision="fp32")).labels.array).mean() > 0.999


def test_ensemble_refuses_models_of_different_structures(small_real_volume, tiny_package, tmp_path):
    other = make_package(tmp_path / "m12", schema="midas12")
    with pytest.raises(SchemaError, match="same structures"):
        segment_volume(small_real_volume, [tiny_package, other], SegmentOptions(mode="ensemble"))


def test_modes_tiles_and_precision(small_real_volume, tiny_package, tiny_umd_package):
    v = small_real_volume
    base = segment_volume(v, [tiny_package], SegmentOptions(tile="patch", precision="fp32")).labels.array
    whole = segment_volume(v, [tiny_package], SegmentOptions(tile="whole", precision="fp32")).labels.array
    assert whole.shape == base.shape
    tta = segment_volume(v, [tiny_package], SegmentOptions(mode="tta", precision="fp32"))
    assert tta.report["mode"] == "tta"
    ens = segment_volume(v, [tiny_package, tiny_umd_package], SegmentOptions(mode="ensemble"))
    assert len(ens.report["models"]) == 2
    with pytest.raises(EngineError, match="ensemble"):
        segment_volume(v, [tiny_package, tiny_umd_package], SegmentOptions(mode="fast"))
    with pytest.raises(EngineError, match="at least two"):
        segment_volume(v, [tiny_package], SegmentOptions(mode="ensemble"))
    with pytest.raises(EngineError, match="unknown mode"):
        segment_volume(v, [tiny_package], SegmentOptions(mode="best"))


def test_cuda_request_without_gpu_is_a_clear_error(small_real_volume, tiny_package):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the error path cannot be exercised")
    with pytest.raises(EngineError, match="no CUDA GPU"):
        segment_volume(small_real_volume, [tiny_package], SegmentOptions(device="cuda"))


def test_progress_and_cancel(small_real_volume, tiny_package):
    seen = []
    segment_volume(small_real_volume, [tiny_package], SegmentOptions(batch_size=2, tile="patch"),
                   progress=lambda d, t: seen.append((d, t)))
    assert seen and seen[-1][0] == seen[-1][1] and [d for d, _ in seen] == list(range(1, len(seen) + 1))
    stop = threading.Event()

    def progress(done, total):
        if done == 2:
            stop.set()

    with pytest.raises(Cancelled):
        segment_volume(small_real_volume, [tiny_package], SegmentOptions(batch_size=1), progress=progress,
                       cancel=stop)


def test_simulated_cuda_oom_shrinks_batch_then_falls_back_to_cpu(small_real_volume, tiny_package, monkeypatch):
    """Pretend to be on CUDA and run out of memory: the batch halves, then the run moves to the CPU."""
    from LumbarSegmentLib.inference import engine, runners

    calls = {"n": 0}
    real_run = runners.Runner._run

    def fake_run(self, x):
        if self.device.type == "cuda":
            calls["n"] += 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_run(self, x)

    class FakeCuda:
        type = "cuda"

        def __str__(self):
            return "cuda"

    def fake_place(self, device):
        self.device = device
        self.dtype = None

    monkeypatch.setattr(runners.Runner, "_run", fake_run)
    monkeypatch.setattr(runners.Runner, "_place", fake_place)
    monkeypatch.setattr(engine, "pick_device", lambda name: FakeCuda())
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    res = segment_volume(small_real_volume, [tiny_package], SegmentOptions(batch_size=4, precision="fp32"))
    w = " | ".join(res.report["warnings"])
    assert "batch size reduced to 2" in w and "batch size reduced to 1" in w and "continuing on the CPU" in w
    assert calls["n"] == 3
    ref = segment_volume(small_real_volume, [tiny_package], SegmentOptions(precision="fp32"))
    np.testing.assert_array_equal(res.labels.array, ref.labels.array)


@pytest.mark.parametrize("fill", [0.0, 7.0])
def test_constant_volume_is_refused(tiny_package, fill):
    v = Volume(np.full((8, 64, 64), fill, dtype=np.float32))
    with pytest.raises(VolumeError, match="all zero|constant"):
        segment_volume(v, [tiny_package])


def test_nan_voxels_are_reported(small_real_volume, tiny_package):
    arr = small_real_volume.array.astype(np.float32)
    arr[0, 0, :] = np.nan
    res = segment_volume(small_real_volume.with_array(arr), [tiny_package])
    assert any("NaN" in w for w in res.report["warnings"])


def test_axial_stack_needs_explicit_reslice(tiny_package):
    rng = np.random.default_rng(0)
    axial = Volume(rng.random((12, 64, 64), dtype=np.float32) + 1, spacing=(0.8, 0.8, 4.0))  # thick along S
    with pytest.raises(OrientationError, match="axial"):
        segment_volume(axial, [tiny_package])
    res = segment_volume(axial, [tiny_package], SegmentOptions(allow_reslice=True))
    assert res.labels.same_geometry(axial)
    assert any("resliced" in w for w in res.report["warnings"])


def test_memory_is_chunked(small_real_volume, tiny_package):
    """Chunking slices does not change the result (the engine never holds all probabilities)."""
    a = segment_volume(small_real_volume, [tiny_package], SegmentOptions(chunk_slices=1, precision="fp32"))
    b = segment_volume(small_real_volume, [tiny_package], SegmentOptions(chunk_slices=64, precision="fp32"))
    np.testing.assert_array_equal(a.labels.array, b.labels.array)


@pytest.mark.parametrize("sigma_mm, slice_mm, chunk", [(4.0, 1.0, 16), (4.0, 1.0, 1), (4.0, 4.0, 5), (2.0, 1.0, 64)])
def test_slice_smoothing_streams_exactly_the_whole_stack_average(sigma_mm, slice_mm, chunk):
    """Fed chunk by chunk, every slice comes out once, equal to the Gaussian average over the whole
    stack (outermost slice repeated beyond the ends), sigma in millimetres; and the same whatever the
    chunk size (the ring buffer wraps at different places for different chunks)."""
    from LumbarSegmentLib.inference.slice_smoothing import SliceSmoother

    p = torch.rand(23, 3, 4, 5, generator=torch.Generator().manual_seed(0)).softmax(dim=1)
    sm = SliceSmoother(p.shape[0], slice_mm, sigma_mm, chunk=min(chunk, 4))  # a bigger chunk grows the ring
    assert sm.r == int(np.ceil(3 * sigma_mm / slice_mm))
    out, starts = torch.full_like(p, -1.0), []
    for c0 in range(0, p.shape[0], chunk):
        for s0, block in sm.push(p[c0:c0 + chunk].clone()):
            assert block.shape[0] <= chunk  # blocks no larger than the chunk: bounded memory downstream
            starts.append(s0)
            out[s0:s0 + block.shape[0]] = block
    x = np.arange(-sm.r, sm.r + 1)
    w = np.exp(-0.5 * (x * slice_mm / sigma_mm) ** 2)
    padded = torch.cat([p[:1].expand(sm.r, -1, -1, -1), p, p[-1:].expand(sm.r, -1, -1, -1)])
    ref = sum(float(wi / w.sum()) * padded[i:i + p.shape[0]] for i, wi in enumerate(w))
    assert starts == sorted(set(starts)) and torch.allclose(out, ref, atol=1e-6)
    whole = SliceSmoother(p.shape[0], slice_mm, sigma_mm).push(p.clone())
    assert torch.allclose(torch.cat([b for _, b in whole]), out, atol=1e-6)
    assert torch.allclose(out.sum(dim=1), torch.ones(23, 4, 5), atol=1e-5)  # still probabilities


def test_slice_smoothing_ring_grows_for_a_larger_chunk_without_losing_neighbours():
    from LumbarSegmentLib.inference.slice_smoothing import SliceSmoother

    p = torch.rand(23, 3, 4, 5, generator=torch.Generator().manual_seed(1)).softmax(dim=1)
    whole = torch.cat([b for _, b in SliceSmoother(23, 1.0, 2.0).push(p.clone())])
    sm, got, c0 = SliceSmoother(23, 1.0, 2.0, chunk=1), [], 0
    for size in (1, 2, 3, 5, 12):  # every chunk larger than the ring was sized for
        got += sm.push(p[c0:c0 + size].clone())
        c0 += size
    assert [s0 for s0, _ in got] == sorted({s0 for s0, _ in got})
    assert torch.allclose(torch.cat([b for _, b in got]), whole, atol=1e-6)


def test_slice_smoothing_off_passes_probabilities_through(small_real_volume, tiny_package):
    from LumbarSegmentLib.inference.slice_smoothing import SliceSmoother

    p = torch.rand(5, 3, 2, 2)
    assert SliceSmoother(5, 1.0, 0.0).push(p) == [(0, p)] and SliceSmoother(1, 1.0, 4.0).r == 0
    off = segment_volume(small_real_volume, [tiny_package], SegmentOptions(precision="fp32", slice_smoothing_mm=0))
    on = segment_volume(small_real_volume, [tiny_package], SegmentOptions(precision="fp32"))
    assert (off.report["slice_smoothing_mm"], on.report["slice_smoothing_mm"]) == (0, 4.0)
    assert (off.labels.array != on.labels.array).any()  # neighbours' opinions do change some voxels
    with pytest.raises(EngineError, match="--slice-smoothing .*: use 0 \\(off\\) to 50 mm"):
        segment_volume(small_real_volume, [tiny_package], SegmentOptions(slice_smoothing_mm=-1))
