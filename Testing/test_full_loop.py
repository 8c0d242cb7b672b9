"""The product's loop on real MRML and a real case, end to end, with real processes:

volume node -> Segment (the CLI in a worker process, tiny model from the user registry) -> an
annotator's edit through the MRML API -> Export (case format) -> retrain (lumbarseg-train finetune
in a background process, a short run) -> publish -> a new version in the registry -> Segment again
with it.
"""
import time

import numpy as np
import pytest

from LumbarSegmentLib import mrml
from LumbarSegmentLib.cases import list_cases
from LumbarSegmentLib.packages import Registry
from LumbarSegmentLib.slicer_logic import DONE, ModuleLogic, SegmentRequest


def test_segment_edit_export_retrain_publish_segment_again(small_real_volume, tiny_package, tmp_path, monkeypatch):
    monkeypatch.setenv("LUMBARSEG_HOME", str(tmp_path / "home"))
    user = Registry(tmp_path / "home" / "models")
    user.publish(tiny_package, make_default=True)
    ctx = mrml.MRMLContext.standalone()
    core = ModuleLogic(ctx.scene, ctx.seg_logic, registries=[user])

    node = mrml.volume_to_node(ctx.scene, small_real_volume, "VB3_01 centre")
    seg, _ = core.segment(node, SegmentRequest(models=["uvd-tiny@1"], device="cpu"), timeout=300)
    assert seg is not None and seg.GetName().startswith("VB3_01 centre")
    ids = mrml.segment_ids(seg)
    assert ids, "the draft has no segments"

    # the annotator corrects one segment
    first = ids[0]
    mask = mrml.segment_mask(seg, first, node)
    mask[:, :, :] = False
    mask[2:4, 60:90, 60:90] = True
    mrml.set_segment_mask(ctx.seg_logic, seg, first, mask, node)
    assert mrml.edited_segments(seg) == [first]

    dataset = tmp_path / "dataset"
    case = core.export(node, seg, dataset, "VB3_01-centre")
    assert case.extra["edited_structures"] == [first]
    assert [c.case_id for c in list_cases(dataset)] == ["VB3_01-centre"]

    # retrain: fine-tune the drafting model on the export, briefly, then publish
    core.start_retrain(dataset, tmp_path / "run", base_model="uvd-tiny@1",
                       extra_args=["--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "2",
                                   "--patch", "64", "--threads", "1", "--device", "cpu"])
    deadline = time.monotonic() + 300
    while not (st := core.poll_retrain()).finished:
        assert time.monotonic() < deadline, "training did not finish"
        time.sleep(0.2)
    assert st.state == DONE, st.message
    versions = user.index()["models"]["uvd-tiny"]["versions"]
    assert versions == [1, 2], f"expected a second version in the registry, got {user.index()}: {st.message}"

    # segment again with the new version
    seg2, _ = core.segment(node, SegmentRequest(models=["uvd-tiny@2"], device="cpu"), timeout=300)
    assert seg2 is not None and seg2 is not seg
    assert seg.GetID() != seg2.GetID()  # a new node: the annotator's edits are untouched
    assert mrml.edited_segments(seg) == [first]
