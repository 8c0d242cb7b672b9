"""Label schemas: which integer value in a label map means which structure.

A schema is data (``LumbarSegmentLib/schemas/*.json``), not code. Every place
that moves labels between a model, a file, a segmentation node and a training
case maps them **by class id** (``"intervertebral_disc"``), never by position:
two schemas may order the same structures differently, and a segmentation node
may hold its segments in any order.

The terminology of a class is a DICOM/SNOMED CT triple ``(scheme, code,
meaning)`` for category, type and optional modifier; ``terminology_string``
renders it in the ``~``-separated form that Slicer segments store.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

SCHEMA_FORMAT = "lumbarsegment.schema"
SCHEMA_FORMAT_VERSION = 1
SCHEMA_DIR = Path(__file__).resolve().parents[1] / "schemas"
BACKGROUND_ID = "background"

Code = tuple  # (coding scheme, code value, code meaning)

# The terminology context the classes' codes live in: LumbarSegment's own list
# (schemas/terminology/LumbarSegment.term.json, built from these schemas and loaded by the Slicer
# module), because Slicer's bundled lists lack codes such as "Vertebral body". Models published
# before it existed name Slicer's General Anatomy list, which does not hold their codes; reading
# them maps that name to this one so Slicer's terminology selector finds their segments.
TERMINOLOGY_CONTEXT = "Segmentation category and type - LumbarSegment"
_MISNAMED_CONTEXTS = {"Segmentation category and type - 3D Slicer General Anatomy list"}


class SchemaError(ValueError):
    """A schema file or a label mapping is inconsistent."""


@dataclass(frozen=True)
class LabelClass:
    value: int
    id: str
    name: str
    color: tuple[int, int, int]
    category: Code | None = None
    type: Code | None = None
    modifier: Code | None = None
    code_note: str = ""

    @property
    def color_float(self) -> tuple[float, float, float]:
        return tuple(c / 255.0 for c in self.color)  # type: ignore[return-value]

    def to_dict(self) -> dict:
        out = {"value": self.value, "id": self.id, "name": self.name, "color": list(self.color)}
        for key in ("category", "type", "modifier"):
            code = getattr(self, key)
            if code:
                out[key] = list(code)
        if self.code_note:
            out["code_note"] = self.code_note
        return out


def _code(raw, where: str) -> Code | None:
    if raw is None:
        return None
    if not (isinstance(raw, (list, tuple)) and len(raw) == 3 and all(isinstance(x, str) for x in raw)):
        raise SchemaError(f"{where}: a code must be [scheme, value, meaning] strings, got {raw!r}")
    return tuple(raw)


@dataclass(frozen=True)
class LabelSchema:
    name: str
    classes: tuple[LabelClass, ...]
    title: str = ""
    terminology_context: str = TERMINOLOGY_CONTEXT
    _by_id: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        ids, values = set(), set()
        for c in self.classes:
            if not c.id or not c.id.replace("_", "a").isalnum() or c.id.lower() != c.id:
                raise SchemaError(f"schema {self.name!r}: class id {c.id!r} is not snake_case")
            if c.id in ids:
                raise SchemaError(f"schema {self.name!r}: class id {c.id!r} appears twice")
            if c.value in values:
                raise SchemaError(f"schema {self.name!r}: label value {c.value} appears twice")
            if not 0 <= c.value <= 255:
                raise SchemaError(f"schema {self.name!r}: label value {c.value} of {c.id!r} is outside 0..255")
            if len(c.color) != 3 or not all(0 <= x <= 255 for x in c.color):
                raise SchemaError(f"schema {self.name!r}: colour of {c.id!r} must be three ints 0..255")
            ids.add(c.id)
            values.add(c.value)
        if not any(c.id == BACKGROUND_ID and c.value == 0 for c in self.classes):
            raise SchemaError(f"schema {self.name!r}: needs a 'background' class with value 0")
        self._by_id.update({c.id: c for c in self.classes})

    # --- lookups -----------------------------------------------------------------
    @property
    def ids(self) -> list[str]:
        return [c.id for c in self.classes]

    @property
    def foreground(self) -> list[LabelClass]:
        return [c for c in self.classes if c.id != BACKGROUND_ID]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __getitem__(self, class_id: str) -> LabelClass:
        try:
            return self._by_id[class_id]
        except KeyError:
            raise SchemaError(
                f"class {class_id!r} is not in schema {self.name!r} (it has: {', '.join(self.ids)})"
            ) from None

    def __contains__(self, class_id: str) -> bool:
        return class_id in self._by_id

    def by_value(self, value: int) -> LabelClass:
        for c in self.classes:
            if c.value == int(value):
                return c
        raise SchemaError(f"label value {value} is not in schema {self.name!r}")

    def find_by_name(self, name: str) -> LabelClass | None:
        """Match a segment name to a class: by id, then display name, case-insensitively."""
        key = name.strip().lower().replace(" ", "_")
        for c in self.classes:
            if key in (c.id, c.name.lower().replace(" ", "_")):
                return c
        return None

    def value_to_id(self) -> dict[int, str]:
        return {c.value: c.id for c in self.classes}

    def channel_of(self) -> dict[str, int]:
        """Model output channel per class id: channels follow the schema's order."""
        return {c.id: i for i, c in enumerate(self.classes)}

    # --- the one place where label values and model channels meet ---------------
    def values_to_channels(self, labels, missing: int = 255):
        """Label map in this schema's values -> channel indices (values it lacks -> ``missing``).

        Training targets and metrics work on channel indices; files and the engine's output
        carry label values. A schema may give its classes any values in any order, so the two
        are never assumed equal: every conversion goes through here or :meth:`channels_to_values`.
        """
        import numpy as np

        lut = np.full(256, missing, dtype=np.uint8)
        for ch, c in enumerate(self.classes):
            lut[c.value] = ch
        arr = np.asarray(labels)
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise SchemaError(f"label values outside 0..255 in a map for schema {self.name!r}")
        return lut[arr.astype(np.intp, copy=False)]

    def channels_to_values(self, channels):
        """Channel indices (e.g. an arg-max) -> this schema's label values (uint8)."""
        import numpy as np

        lut = np.array([c.value for c in self.classes], dtype=np.uint8)
        return lut[np.asarray(channels).astype(np.intp, copy=False)]

    # --- terminology -------------------------------------------------------------
    def terminology_string(self, class_id: str) -> str:
        """Slicer's serialised terminology entry for one class (empty for background)."""
        c = self[class_id]
        if not c.type:
            return ""

        def enc(code):
            return "^".join(code) if code else "^^"

        return "~".join([
            self.terminology_context, enc(c.category), enc(c.type), enc(c.modifier),
            "Anatomic codes - DICOM master list", "^^", "^^",
        ])

    # --- (de)serialisation -------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": SCHEMA_FORMAT, "format_version": SCHEMA_FORMAT_VERSION, "name": self.name,
            "title": self.title, "terminology_context": self.terminology_context,
            "classes": [c.to_dict() for c in self.classes],
        }

    @classmethod
    def from_dict(cls, data: Mapping, where: str = "schema") -> "LabelSchema":
        if not isinstance(data, Mapping):
            raise SchemaError(f"{where}: expected a JSON object")
        fmt = data.get("format", SCHEMA_FORMAT)
        if fmt != SCHEMA_FORMAT:
            raise SchemaError(f"{where}: format is {fmt!r}, expected {SCHEMA_FORMAT!r}")
        version = int(data.get("format_version", 1))
        if version > SCHEMA_FORMAT_VERSION:
            raise SchemaError(
                f"{where}: schema format version {version} is newer than this LumbarSegment "
                f"understands ({SCHEMA_FORMAT_VERSION}); update LumbarSegment"
            )
        try:
            classes = tuple(
                LabelClass(
                    value=int(c["value"]), id=str(c["id"]), name=str(c.get("name", c["id"])),
                    color=tuple(int(x) for x in c.get("color", (128, 128, 128))),
                    category=_code(c.get("category"), f"{where}:{c['id']}"),
                    type=_code(c.get("type"), f"{where}:{c['id']}"),
                    modifier=_code(c.get("modifier"), f"{where}:{c['id']}"),
                    code_note=str(c.get("code_note", "")),
                )
                for c in data["classes"]
            )
            name = str(data["name"])
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, SchemaError):
                raise
            raise SchemaError(f"{where}: malformed schema ({exc!r})") from None
        context = str(data.get("terminology_context", TERMINOLOGY_CONTEXT))
        return cls(name=name, classes=classes, title=str(data.get("title", "")),
                   terminology_context=TERMINOLOGY_CONTEXT if context in _MISNAMED_CONTEXTS else context)


def available_schemas() -> list[str]:
    return sorted(p.stem for p in SCHEMA_DIR.glob("*.json"))


def load_schema(name_or_path: str | Path) -> LabelSchema:
    """Load a shipped schema by name (``"starter"``) or any schema JSON file by path."""
    p = Path(name_or_path)
    if not p.suffix:
        p = SCHEMA_DIR / f"{name_or_path}.json"
        if not p.exists():
            raise SchemaError(
                f"unknown schema {str(name_or_path)!r}; shipped schemas: {', '.join(available_schemas())}"
            )
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SchemaError(f"cannot read schema {p}: {exc}") from None
    return LabelSchema.from_dict(data, where=str(p))


def remap_labels(labels, source: Mapping[int, str], target: LabelSchema, *, unknown: str = "error"):
    """Map a label array whose values mean ``source[value]`` (class ids) onto ``target``'s values.

    ``unknown="error"`` refuses a class id the target does not have, naming it;
    ``unknown="background"`` maps it to 0. Values absent from ``source`` are an error
    unless zero (background).
    """
    import numpy as np

    labels = np.asarray(labels)
    out = np.zeros(labels.shape, dtype=np.uint8)
    present = np.unique(labels)
    for v in present:
        v = int(v)
        cid = source.get(v, source.get(str(v)) if isinstance(source, dict) else None)
        if cid is None:
            if v == 0:
                continue
            raise SchemaError(f"label value {v} has no meaning in the mapping {dict(source)}")
        if cid not in target:
            if unknown == "background":
                continue
            raise SchemaError(
                f"structure {cid!r} (label value {v}) is not in schema {target.name!r} "
                f"(it has: {', '.join(target.ids)})"
            )
        out[labels == v] = target[cid].value
    return out


def check_compatible(model_schema: LabelSchema, class_ids: Iterable[str]) -> None:
    """Refuse class ids a model's schema cannot produce or learn (dataset/model mismatch)."""
    missing = [c for c in class_ids if c not in model_schema]
    if missing:
        raise SchemaError(
            f"structures {missing} are not in the model's schema {model_schema.name!r} "
            f"({', '.join(model_schema.ids)}); use a schema that has them (fine-tuning can add classes)"
        )
