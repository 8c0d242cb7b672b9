"""Terminology: every code a shipped schema or shipped model writes into a segment exists in the
context it names, and that context is a file the Slicer module loads (and the packages carry)."""
from __future__ import annotations

import json
from pathlib import Path

from LumbarSegmentLib.registry.packages import Registry, shipped_registry_root
from LumbarSegmentLib.core.schema import TERMINOLOGY_CONTEXT, LabelSchema, available_schemas, load_schema
from LumbarSegmentLib.core.terminology import render, terminology_file

ROOT = Path(__file__).resolve().parents[1]


def _codes_in_file() -> tuple[str, set]:
    data = json.loads(terminology_file().read_text())
    pairs = set()
    for cat in data["SegmentationCodes"]["Category"]:
        for typ in cat["Type"]:
            pairs.add(((cat["CodingSchemeDesignator"], cat["CodeValue"]), (typ["CodingSchemeDesignator"], typ["CodeValue"])))
    return data["SegmentationCategoryTypeContextName"], pairs


def _check(schema: LabelSchema, context: str, pairs: set) -> None:
    assert schema.terminology_context == context, schema.name
    for cls in schema.foreground:
        assert ((cls.category[0], cls.category[1]), (cls.type[0], cls.type[1])) in pairs, (schema.name, cls.id)
        entry = schema.terminology_string(cls.id)
        assert entry.startswith(context + "~") and f"~{cls.type[0]}^{cls.type[1]}^" in entry


def test_term_file_is_generated_from_the_schemas():
    assert terminology_file().read_text() == render(), "run: python -m LumbarSegmentLib.core.terminology"


def test_shipped_schemas_and_models_use_codes_of_the_context_they_name():
    context, pairs = _codes_in_file()
    assert context == TERMINOLOGY_CONTEXT
    for name in available_schemas():
        _check(load_schema(name), context, pairs)
    packages = Registry(shipped_registry_root(), read_only=True).packages()
    assert packages
    for pkg in packages:  # published with the old context name: mapped when read
        _check(pkg.schema, context, pairs)


def test_the_misnamed_general_anatomy_context_is_mapped_and_others_are_kept():
    data = load_schema("starter").to_dict()
    data["terminology_context"] = "Segmentation category and type - 3D Slicer General Anatomy list"
    assert LabelSchema.from_dict(data).terminology_context == TERMINOLOGY_CONTEXT
    data["terminology_context"] = "Segmentation category and type - My site"
    assert LabelSchema.from_dict(data).terminology_context == "Segmentation category and type - My site"


def test_slicer_module_loads_the_file_and_the_extension_installs_it():
    source = (ROOT / "LumbarSegment" / "LumbarSegment.py").read_text()
    assert 'connect("startupCompleted()", loadTerminology)' in source
    assert "LoadTerminologyFromFile(str(terminology_file()))" in source
    rel = terminology_file().relative_to(ROOT).as_posix()
    assert rel in (ROOT / "LumbarSegment" / "CMakeLists.txt").read_text()
