"""The case format shared by export and training: read the public cases, write versions, refuse bad input."""
import json
import threading

import numpy as np
import pytest

from LumbarSegmentLib.dataset.cases import CaseError, list_cases, read_case, validate_case_id, write_case
from LumbarSegmentLib.core.volume import Volume


def test_public_cases_read_as_version_1(shared_data):
    folder = shared_data / "lumbar-mr"
    cases = list_cases(folder)
    # every case file of the data set reads (the set grows: count the files, do not hard-code it)
    assert len(cases) == len(list(folder.glob("*.json"))) >= 13
    assert {c.case_id.split("_")[0] for c in cases} >= {"IVD", "VB1", "VB2", "VB3"}
    ivd = next(c for c in cases if c.case_id == "IVD_11")
    assert ivd.annotated_structures == ["intervertebral_disc"] and set(ivd.labels.values()) == {"intervertebral_disc"}
    image, label = ivd.load()
    assert image.same_geometry(label)


def _vol(shape=(4, 8, 8), fill=0, **geo):
    a = np.full(shape, fill, dtype=np.uint8)
    return Volume(a, **geo)


def test_write_versions_never_overwrite(tmp_path):
    img = _vol(fill=5)
    lab = _vol()
    lab.array[1, 2:4, 2:4] = 1
    c1 = write_case(tmp_path, "case-1", img, lab, labels={1: "vertebral_body"}, annotated_structures=["vertebral_body"])
    c2 = write_case(tmp_path, "case-1", img, lab, labels={1: "vertebral_body"}, annotated_structures=["vertebral_body"],
                    extra={"edited_structures": ["vertebral_body"]})
    assert (c1.version, c2.version) == (1, 2) and c1.json_path.exists() and c2.json_path.exists()
    latest = list_cases(tmp_path)
    assert len(latest) == 1 and latest[0].version == 2 and latest[0].extra["edited_structures"] == ["vertebral_body"]
    assert len(list_cases(tmp_path, latest_only=False)) == 2
    image, label = latest[0].load()
    np.testing.assert_array_equal(label.array, lab.array)


def test_concurrent_exports_get_distinct_versions(tmp_path):
    img, lab = _vol(fill=3), _vol()
    out, errors = [], []

    def go():
        try:
            out.append(write_case(tmp_path, "same", img, lab, labels={}, annotated_structures=["vertebral_body"]).version)
        except Exception as exc:  # pragma: no cover - shown on failure
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and sorted(out) == [1, 2, 3, 4]
    assert len(list_cases(tmp_path, latest_only=False)) == 4


def test_an_export_that_finishes_between_the_look_and_the_claim_is_not_overwritten(tmp_path, monkeypatch):
    """The race behind a rare [1, 2, 2, 3] above: this export sees no version 1, another export then
    writes version 1 completely and releases its claim, and only then does this one claim 1."""
    from LumbarSegmentLib.dataset import cases as cases_mod

    img, lab = _vol(fill=3), _vol()
    real_open, raced = cases_mod.os.open, []

    def open_after_the_other_export(path, flags, *args):
        if str(path).endswith(".same__v1.lock") and not raced:
            raced.append(None)  # once: the other export's own claim goes straight through
            raced[0] = write_case(tmp_path, "same", img, lab, labels={}, annotated_structures=["vertebral_body"])
        return real_open(path, flags, *args)

    monkeypatch.setattr(cases_mod.os, "open", open_after_the_other_export)
    mine = write_case(tmp_path, "same", img, lab, labels={}, annotated_structures=["vertebral_body"])
    assert (raced[0].version, mine.version) == (1, 2)
    assert sorted(c.version for c in list_cases(tmp_path, latest_only=False)) == [1, 2]


@pytest.mark.parametrize("cid", ["../evil", "a/b", "..", "", "x" * 65, "a\\b", ".hidden", "c__v2"])
def test_bad_case_ids(cid, tmp_path):
    with pytest.raises(CaseError, match="invalid case id"):
        write_case(tmp_path, cid, _vol(), _vol(), labels={}, annotated_structures=[])
    assert list(tmp_path.iterdir()) == []


def test_inconsistent_cases_are_refused(tmp_path):
    img = _vol(fill=1)
    with pytest.raises(CaseError, match="geometry"):
        write_case(tmp_path, "g", img, _vol(spacing=(2, 1, 1)), labels={}, annotated_structures=[])
    lab = _vol()
    lab.array[0, 0, 0] = 4
    with pytest.raises(CaseError, match="not described"):
        write_case(tmp_path, "v", img, lab, labels={1: "vertebral_body"}, annotated_structures=["vertebral_body"])
    assert not any(p.suffix in (".json", ".mha") for p in tmp_path.iterdir())
    (tmp_path / "bad.json").write_text(json.dumps({"case": "bad", "labels": {"1": "x"}, "image": "i.mha",
                                                   "label": "l.mha", "annotated_structures": []}))
    with pytest.raises(CaseError, match="annotated_structures"):
        read_case(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text(json.dumps({"case": "bad", "labels": {}, "image": "../i.mha",
                                                   "label": "l.mha", "annotated_structures": []}))
    with pytest.raises(CaseError, match="plain names"):
        read_case(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text(json.dumps({"format_version": 7, "case": "bad"}))
    with pytest.raises(CaseError, match="newer"):
        read_case(tmp_path / "bad.json")


def test_label_geometry_mismatch_on_load(tmp_path, shared_data):
    import shutil

    src = shared_data / "lumbar-mr"
    for f in ("VB3_01.json", "VB3_01_image.mha"):
        shutil.copy(src / f, tmp_path / f)
    from LumbarSegmentLib.formats.io import read_volume, write_volume

    lab = read_volume(src / "VB3_01_label.mha")
    write_volume(Volume(lab.array, spacing=(1.0, 1.0, 1.2)), tmp_path / "VB3_01_label.mha")
    with pytest.raises(CaseError, match="label geometry"):
        read_case(tmp_path / "VB3_01.json").load()
    assert validate_case_id("VB3_01") == "VB3_01"
