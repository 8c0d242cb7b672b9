"""The spine6 schema: the starter's classes unchanged, three more structures, a union for whole vertebrae."""
import json

import pytest

from LumbarSegmentLib.core.schema import LabelSchema, SchemaError, check_compatible, load_schema
from LumbarSegmentLib.core.terminology import build_terminology


def test_spine6_keeps_the_starter_classes_comparable():
    spine, starter = load_schema("spine6"), load_schema("starter")
    for cid in starter.ids:  # same id, value and channel: old and new models score the same classes
        assert spine[cid].value == starter[cid].value
        assert spine.channel_of()[cid] == starter.channel_of()[cid]
        assert spine[cid].type == starter[cid].type
    assert set(spine.ids) - set(starter.ids) == {"posterior_elements", "spinal_canal", "sacrum"}
    for c in spine.foreground:
        assert c.category and c.type, c.id
    assert spine.terminology_string("sacrum").split("~")[2] == "SCT^54735007^Sacrum"


def test_union_round_trip_and_members():
    s = load_schema("spine6")
    assert s.union_members("vertebra") == ("vertebral_body", "posterior_elements")
    assert s.union_members("sacrum") == ("sacrum",)
    again = LabelSchema.from_dict(json.loads(json.dumps(s.to_dict())))
    assert again == s and again.unions == s.unions
    assert "unions" not in load_schema("starter").to_dict()  # schemas without unions are written as before


def test_union_makes_a_structure_compatible():
    check_compatible(load_schema("spine6"), ["vertebra", "intervertebral_disc", "spinal_canal"])
    with pytest.raises(SchemaError, match="vertebra"):
        check_compatible(load_schema("starter"), ["vertebra"])


@pytest.mark.parametrize("unions,msg", [
    ({"vertebra": ["vertebral_body"]}, "two or more"),
    ({"vertebra": ["vertebral_body", "spleen"]}, "spleen"),
    ({"vertebra": ["vertebral_body", "background"]}, "background"),
    ({"vertebral_body": ["vertebral_body", "intervertebral_disc"]}, "name of a class"),
])
def test_bad_unions_refused(unions, msg):
    d = load_schema("starter").to_dict()
    d["unions"] = unions
    with pytest.raises(SchemaError, match=msg):
        LabelSchema.from_dict(d)


def test_terminology_holds_the_new_structures():
    types = {t["CodeMeaning"] for cat in build_terminology()["SegmentationCodes"]["Category"] for t in cat["Type"]}
    assert {"Vertebral arch", "Spinal canal", "Sacrum", "Vertebral body", "Intervertebral disc"} <= types
