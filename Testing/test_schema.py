"""Label schemas: shipped files are valid, lookups are by id, mapping never goes by position."""
import json

import numpy as np
import pytest

from LumbarSegmentLib.core.schema import LabelSchema, SchemaError, available_schemas, load_schema, remap_labels


def test_shipped_schemas():
    assert {"midas12", "starter"} <= set(available_schemas())
    m = load_schema("midas12")
    assert m.num_classes == 12 and m.ids[0] == "background"
    assert m["intervertebral_disc"].type[1] == "360499006"
    assert m["sacrum"].type[1] == "54735007"
    assert m["muscle"].type[1] == "127954009"
    assert m["subcutaneous_fat"].type[1] == "67769002"
    assert m["blood_vessel"].type[1] == "59820001"
    s = load_schema("starter")
    assert s.ids == ["background", "vertebral_body", "intervertebral_disc"]
    for c in m.foreground + s.foreground:
        assert c.category and c.type, c.id  # every structure has terminology
    term = m.terminology_string("sacrum")
    assert term.split("~")[2] == "SCT^54735007^Sacrum" and len(term.split("~")) == 7
    assert m.terminology_string("background") == ""


def test_round_trip_and_lookups():
    s = load_schema("midas12")
    again = LabelSchema.from_dict(json.loads(json.dumps(s.to_dict())))
    assert again == s
    assert s.find_by_name("Intervertebral discs").id == "intervertebral_disc"
    assert s.find_by_name("nerve_root").value == 9
    assert s.find_by_name("spleen") is None
    with pytest.raises(SchemaError, match="not in schema"):
        s["spleen"]


@pytest.mark.parametrize("bad,msg", [
    ({"classes": [{"value": 1, "id": "a"}]}, "background"),
    ({"classes": [{"value": 0, "id": "background"}, {"value": 0, "id": "x"}]}, "twice"),
    ({"classes": [{"value": 0, "id": "background"}, {"value": 1, "id": "Bad Id"}]}, "snake_case"),
    ({"classes": [{"value": 0, "id": "background"}, {"value": 300, "id": "x"}]}, "0..255"),
    ({"format_version": 99, "classes": []}, "newer"),
])
def test_bad_schemas_are_refused(bad, msg):
    with pytest.raises(SchemaError, match=msg):
        LabelSchema.from_dict({"name": "x", **bad})


def test_remap_is_by_id():
    target = load_schema("starter")
    labels = np.array([[0, 1, 2, 3]])
    # a source whose values mean other things than the target's
    out = remap_labels(labels, {1: "intervertebral_disc", 2: "vertebral_body", 3: "vertebral_body"}, target)
    assert out.tolist() == [[0, 2, 1, 1]]
    with pytest.raises(SchemaError, match="sacrum"):
        remap_labels(labels, {1: "sacrum", 2: "vertebral_body", 3: "vertebral_body"}, target)
    with pytest.raises(SchemaError, match="no meaning"):
        remap_labels(labels, {1: "vertebral_body"}, target)
