"""The product's loop on real MRML and a real case, end to end, with real processes, from the shipped model:

volume node -> Segment (the CLI in a worker process, the shipped default ``uvd-starter@1``) -> an
annotator's edit through the MRML API -> Export (four patients; the frozen split holds one out) ->
retrain (``lumbarseg-train finetune --from uvd-starter@1`` in a background process, a short run, the
held-out case excluded) -> the gate grades candidate and model in use on the held-out case -> publish
into an empty user registry -> Segment again, with the shipped ref and with the fine-tune.

Issue 10's "done when": no duplicate refs, exactly one default, the shipped ref segmenting with its
own weights (sha256), the per-class comparison shown, and too few held-out cases -> not promoted.
"""
import time

import pytest

from LumbarSegmentLib.slicer import mrml
from LumbarSegmentLib.dataset.cases import read_case
from LumbarSegmentLib.dataset.holdout import frozen_split
from LumbarSegmentLib.registry.package import shipped_registry_root
from LumbarSegmentLib.registry.catalog import Catalog, resolve_model
from LumbarSegmentLib.slicer.logic import DONE, ModuleLogic, SegmentRequest


def test_fine_tune_of_the_shipped_default_never_shadows_it(small_real_volume, tmp_path, monkeypatch):
    monkeypatch.setenv("LUMBARSEG_HOME", str(tmp_path / "home"))  # an empty user registry
    default, nxt = _shipped_default_and_next()  # whatever the shipped default is today, and the next version
    shipped = resolve_model(default)
    assert shipped.path.parent.parent == shipped_registry_root()
    ctx = mrml.MRMLContext.standalone()
    core = ModuleLogic(ctx.scene, ctx.seg_logic)

    node = mrml.volume_to_node(ctx.scene, small_real_volume, "VB3_01 centre")
    seg, _ = core.segment(node, SegmentRequest.of(device="cpu", threads=1), timeout=600)
    assert mrml.drafted_by(seg) == {"model": default, "sha256": shipped.sha256}
    assert core.export_warning(seg), "an untouched draft must be flagged before export"
    first = mrml.segment_ids(seg)[0]
    mask = mrml.segment_mask(seg, first, node)
    mask[60:90, 60:90, 1:3] = ~mask[60:90, 60:90, 1:3]  # [k, j, i]: six sagittal slices along i
    mrml.set_segment_mask(ctx.seg_logic, seg, first, mask, node)
    assert mrml.edited_segments(seg) == [first] and core.export_warning(seg) is None

    dataset = tmp_path / "dataset"
    for i in range(1, 5):  # four patients: the frozen split holds out the fourth
        request = mrml.ExportRequest(dataset, f"case{i}", patient=f"P{i}")
        mrml.export_case(ctx.scene, ctx.seg_logic, node, seg, mrml.schema_of_node(seg), request)
    split = frozen_split(dataset)
    assert split.holdout_ids == ["case4"] and read_case(split.holdout[0].json_path).extra["edited_structures"]

    core.start_retrain(dataset, tmp_path / "run", base_model=default, epochs=1,
                       extra_args=["--steps-per-epoch", "2", "--batch-size", "2", "--patch", "64", "--threads", "1",
                                   "--device", "cpu"])
    deadline = time.monotonic() + 900
    while not (st := core.poll_retrain()).finished:
        assert time.monotonic() < deadline, "training did not finish"
        time.sleep(0.5)
    assert st.state == DONE, st.message
    event = core.trainer.publish_event
    assert event is not None, st.message
    # the gate graded on the held-out case only, against the model in use, and said it was too few
    assert event["ref"] == nxt and event["default"] is False
    assert "only 1 held-out case" in event["reason"] and f"{default} (in use)" in event["reason"]
    assert event["comparison"]["cases"] == ["case4"] and event["comparison"]["current_ref"] == default
    assert "case4" not in (resolve_model(nxt).manifest["training"].get("train_cases") or [])
    assert first in event["comparison"]["per_class"] and "in use" in event["table"] and "change" in event["table"]

    # identity: each ref once, exactly one default, the shipped ref still the shipped weights
    entries = Catalog().entries()
    refs = [e.package.ref for e in entries]
    assert len(refs) == len(set(refs)) and {default, nxt} <= set(refs)
    assert [e.package.ref for e in entries if e.default] == [default]
    by_ref = {e.package.ref: e for e in entries}
    assert by_ref[default].source == "shipped" and by_ref[nxt].source == "user"
    assert by_ref[nxt].package.parent == {"ref": default, "sha256": shipped.sha256}
    assert resolve_model(default).sha256 == shipped.sha256
    labels = [label for label, ref in core.model_choices()]
    assert len(labels) == len(set(ref for _, ref in core.model_choices()))

    # segment again: the shipped ref with its own weights, the fine-tune with its own
    again, _ = core.segment(node, SegmentRequest.of(models=[default], device="cpu", threads=1), timeout=600)
    assert mrml.drafted_by(again) == {"model": default, "sha256": shipped.sha256}
    tuned, _ = core.segment(node, SegmentRequest.of(models=[nxt], device="cpu", threads=1), timeout=600)
    assert mrml.drafted_by(tuned)["sha256"] == resolve_model(nxt).sha256 != shipped.sha256
    assert mrml.edited_segments(seg) == [first]  # new nodes: the annotator's edits are untouched
    name, version = nxt.split("@")
    with pytest.raises(Exception):  # one fine-tune, one new version: nothing beyond it
        resolve_model(f"{name}@{int(version) + 1}")


def _shipped_default_and_next() -> tuple[str, str]:
    """The shipped registry's default ref and the ref a fine-tune of it gets (versions never restart)."""
    from LumbarSegmentLib.registry.package import shipped_registry_root
    from LumbarSegmentLib.registry.registry import Registry

    shipped = Registry(shipped_registry_root(), read_only=True)
    default = shipped.default_ref()
    name = default.split("@")[0]
    return default, f"{name}@{max(int(v) for v in shipped.index()['models'][name]['versions']) + 1}"
