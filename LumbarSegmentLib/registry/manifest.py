"""What a model manifest and a registry index may contain, and the hash that seals a manifest's meaning.

A manifest is read from a folder a user may have been sent, and an index from a folder
anyone with write access may have edited. Both are checked field by field before any
other code uses them, so a wrong type becomes a message naming the field, never a
traceback, and a name can never lead outside the registry.

**Integrity.** ``weights.sha256`` proves the weights are the ones the manifest names,
but not that the manifest still says what it said when the package was made: swapping
two classes' names and values in ``manifest.json`` would swap the structures in every
output. So a package also records ``integrity.sha256``, the sha256 of the canonical JSON
(sorted keys, no spaces) of the fields that decide what the model outputs:
``format``, ``format_version``, ``architecture``, ``schema``, ``input`` and ``weights``
(whose own ``sha256`` ties in the weights), and (scheme v2) the training provenance the publish
gate relies on (``training.train_cases``, ``val_cases``, ``data_manifest`` and its sha256). Name,
version, metrics and notes are left out, so a registry can number a copy without re-sealing its meaning.
Packages made before this field existed are accepted only from the shipped registry
(part of the installation); any other package without it must be made or published again.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

INTEGRITY_SCHEME = "lumbarsegment.manifest-sha256.v2"  # v2 also seals the training provenance (below)
LEGACY_SCHEME = "lumbarsegment.manifest-sha256.v1"  # still accepted; its provenance is not sealed
PROVENANCE_FIELDS = ("train_cases", "val_cases", "data_manifest", "data_manifest_sha256")
SEMANTIC_FIELDS = ("format", "format_version", "architecture", "schema", "input", "weights")
_WEIGHT_FIELDS = ("file", "sha256", "dtype")
SLICE_CONTEXT_MAX = 4  # neighbour slices on each side a 2.5D model may read (input.slice_context)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(ValueError):
    """A manifest or registry index field has the wrong type or value."""


def validate_name(name, where: str) -> str:
    """A model name usable as one folder name: letters, digits, ``_ . -``; no ``..``, no separators."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise ManifestError(f"{where}: model name {name!r} is not allowed: use 1-64 letters, digits, '_', '-' or "
                            f"'.', starting with a letter or digit, without '..' or path separators")
    return name


def _int(value, what: str, where: str, lo: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ManifestError(f"{where}: {what} must be a whole number >= {lo}, got {value!r}")
    return value


def _numbers(value, n: int, what: str, where: str, *, integer: bool = False, lo: float = 0.0,
             hi: float = math.inf) -> list:
    ok = isinstance(value, list) and len(value) == n and all(
        not isinstance(v, bool) and isinstance(v, (int,) if integer else (int, float)) and math.isfinite(v)
        and lo < v <= hi for v in value)
    if not ok:
        kind = "whole numbers" if integer else "numbers"
        raise ManifestError(f"{where}: {what} must be a list of {n} {kind} above {lo:g}"
                            f"{'' if hi == math.inf else f' and at most {hi:g}'}, got {value!r}")
    return value


def _obj(value, what: str, where: str) -> dict:
    if not isinstance(value, dict):
        raise ManifestError(f"{where}: {what} must be an object, got {type(value).__name__} {value!r:.60}")
    return value


def validate_manifest(m, where: str, *, newest_format: int, model_format: str) -> None:
    """Check every field a loader relies on; raises :class:`ManifestError` naming the first bad one."""
    _obj(m, "the manifest", where)
    if m.get("format") != model_format:
        raise ManifestError(f"{where}: format is {m.get('format')!r}, expected {model_format!r}")
    version = _int(m.get("format_version"), "format_version", where)
    if version > newest_format:
        raise ManifestError(f"{where}: model format version {version} is newer than this LumbarSegment supports "
                            f"({newest_format}); update LumbarSegment to use this model")
    for key in ("name", "version", "architecture", "schema", "input", "weights"):
        if key not in m:
            raise ManifestError(f"{where}: manifest lacks '{key}'")
    validate_name(m["name"], where)
    _int(m["version"], "version", where)
    _obj(m["architecture"], "architecture", where)
    _obj(m["schema"], "schema", where)
    inp = _obj(m["input"], "input", where)
    _numbers(inp.get("spacing_mm"), 2, "input.spacing_mm", where, lo=0.0, hi=100.0)
    if "patch_size" in inp:
        _numbers(inp["patch_size"], 2, "input.patch_size", where, integer=True, lo=7, hi=4096)
    k = inp.get("slice_context", 0)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= SLICE_CONTEXT_MAX:
        raise ManifestError(f"{where}: input.slice_context must be an integer 0-{SLICE_CONTEXT_MAX} (neighbour slices "
                            f"on each side), got {k!r}")
    channels = inp.get("channels", 1)
    guides = _guidance_channels(inp, m["schema"], where)
    if isinstance(channels, bool) or channels != 2 * k + 1 + guides:
        raise ManifestError(f"{where}: input.channels must be the number {2 * k + 1 + guides} (one MR slice, {k} "
                            f"neighbour(s) on each side and {guides} click map(s)), got {channels!r}")
    if m["architecture"].get("in_channels", channels) != channels:
        raise ManifestError(f"{where}: architecture.in_channels ({m['architecture'].get('in_channels')!r}) is not "
                            f"input.channels ({channels})")
    w = _obj(m["weights"], "weights", where)
    if not isinstance(w.get("file"), str):
        raise ManifestError(f"{where}: weights.file must be a file name, got {w.get('file')!r}")
    if not isinstance(w.get("sha256"), str) or not _SHA256.match(w["sha256"]):
        raise ManifestError(f"{where}: weights.sha256 must be 64 lower-case hex digits, got {w.get('sha256')!r:.80}")
    for key in ("training", "metrics"):
        if key in m:
            _obj(m[key], key, where)
    if "integrity" in m:
        _obj(m["integrity"], "integrity", where)


def _guidance_channels(inp: dict, schema, where: str) -> int:
    """Click maps a click-guided model reads after its image channels (``input.guidance``; 0: none)."""
    if "guidance" not in inp:
        return 0
    from LumbarSegmentLib.core.guidance import GuidanceError, GuidanceSpec

    ids = [c.get("id") for c in schema.get("classes", []) if isinstance(c, dict)] if isinstance(schema, dict) else []
    try:
        return GuidanceSpec.from_dict(inp["guidance"], ids, where).channels
    except GuidanceError as exc:
        raise ManifestError(str(exc)) from None


def semantic_hash(m: dict, scheme: str = INTEGRITY_SCHEME) -> str:
    """sha256 of the canonical JSON of the fields that decide what the model outputs (see the module doc).

    Scheme v2 also covers the training provenance (which cases trained and validated the model, and
    their checksums): the publish gate trusts it to keep a candidate's own training cases out of its
    grading, so removing or editing it must break the seal too.
    """
    core = {k: m.get(k) for k in SEMANTIC_FIELDS}
    core["weights"] = {k: (m.get("weights") or {}).get(k) for k in _WEIGHT_FIELDS}
    if scheme != LEGACY_SCHEME:
        training = m.get("training") if isinstance(m.get("training"), dict) else {}
        core["provenance"] = {k: training.get(k, "<absent>") for k in PROVENANCE_FIELDS}
    text = json.dumps(core, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def seal(m: dict, scheme: str = INTEGRITY_SCHEME) -> dict:
    """``m`` with its ``integrity`` record (re)computed; call after the last change to a semantic field.

    Re-sealing a copy keeps the original's ``scheme`` (a registry copy of a v1 package stays v1, so
    its unsealed provenance is never laundered into a sealed one)."""
    return {**m, "integrity": {"scheme": scheme, "sha256": semantic_hash(m, scheme)}}


def provenance_problem(m: dict, *, trusted: bool = False) -> str | None:
    """Why the manifest's record of its training cases cannot be trusted to keep them out of a grading
    (None when it can): missing, of the wrong type, or not covered by the seal. ``trusted``: shipped."""
    training = m.get("training") if isinstance(m.get("training"), dict) else {}
    if not isinstance(training.get("train_cases"), list):
        return "its manifest does not record which cases it trained on (training.train_cases)"
    if trusted:
        return None
    if (m.get("integrity") or {}).get("scheme") != INTEGRITY_SCHEME:
        return ("its record of the cases it trained on is not sealed (made by an older LumbarSegment), so an "
                "edited list could not be detected")
    return None


def check_integrity(m: dict, where: str, *, legacy_ok: bool) -> None:
    """Refuse a manifest whose meaning changed after it was sealed, or an unsealed one (unless ``legacy_ok``)."""
    rec = m.get("integrity")
    if rec is None:
        if legacy_ok:
            return
        raise ManifestError(f"{where}: this package has no integrity record, so a changed manifest (classes, "
                            f"architecture, input) could not be detected; it was made by an older LumbarSegment or "
                            f"edited by hand. Export or publish it again with this version")
    if rec.get("scheme") not in (INTEGRITY_SCHEME, LEGACY_SCHEME):
        raise ManifestError(f"{where}: unknown integrity scheme {rec.get('scheme')!r}; update LumbarSegment")
    if rec.get("sha256") != semantic_hash(m, rec["scheme"]):
        raise ManifestError(f"{where}: manifest.json was changed after the package was made (its integrity hash "
                            f"does not match): the classes, architecture, input contract or the record of its "
                            f"training cases may have been altered. "
                            f"Reinstall or re-publish this model")


def validate_index(data, where: str, fix: str) -> None:
    """Check a registry index's ``models``, ``default`` and ``ensemble`` (types, names, versions)."""
    models = data.get("models", {})
    _obj(models, "'models'", where + f" ({fix})")
    for name, entry in models.items():
        try:
            validate_name(name, where)
        except ManifestError as exc:
            raise ManifestError(f"{exc}; {fix}") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("versions", []), list) or any(
                isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in entry.get("versions", [])):
            raise ManifestError(f"{where}: model {name!r} must be an object with 'versions': a list of whole "
                                f"numbers, got {entry!r:.80}; {fix}")
    default = data.get("default")
    if default is not None and not _is_ref(default):
        raise ManifestError(f"{where}: 'default' must be a model ref like 'name@1' (or null), got {default!r}; {fix}")
    refine = data.get("refine")
    if refine is not None and not _is_ref(refine):
        raise ManifestError(f"{where}: 'refine' must be a model ref like 'name@1' (or null), got {refine!r}; {fix}")
    ensemble = data.get("ensemble", [])
    if not isinstance(ensemble, list) or not all(_is_ref(r) for r in ensemble):
        raise ManifestError(f"{where}: 'ensemble' must be a list of model refs like 'name@1', got {ensemble!r:.80}; "
                            f"{fix}")


def _is_ref(ref) -> bool:
    if not isinstance(ref, str):
        return False
    name, _, ver = ref.partition("@")
    return bool(_NAME.match(name)) and ".." not in name and (not ver or ver.isdigit())


def refuse_pickle(path: Path) -> None:
    """Refuse a pickle / ``torch.save`` zip; a file that starts like a safetensors file passes.

    A safetensors file starts with its header length (8 bytes, little-endian) and then the
    JSON header's ``{``; that length can itself begin with the byte 0x80 or the letters
    "PK", so the safetensors shape is recognised first.
    """
    with open(path, "rb") as f:
        head = f.read(9)
    size = path.stat().st_size
    if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8:
        return
    if head[:2] == b"PK" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        raise ManifestError(
            f"{path}: this is a PyTorch pickle/zip checkpoint, not safetensors. Pickles can run code when "
            f"loaded, so LumbarSegment refuses them. Ask for a safetensors model package; only if you fully "
            f"trust where the file came from, convert it with `lumbarseg-train export`."
        )
    if len(head) < 9:
        raise ManifestError(f"{path}: weights file is truncated; reinstall or re-publish this model")


def registry_write_error(root, exc: OSError) -> str:
    """One line for an OS error while publishing into ``root``: what happened and what to do."""
    import errno as _errno

    if exc.errno in (_errno.ENOSPC, getattr(_errno, "EDQUOT", -1)):
        todo = "free some disk space, or publish into another registry (--registry)"
    elif exc.errno in (_errno.EACCES, _errno.EPERM, _errno.EROFS):
        todo = "publish into a registry folder you can write to (--registry), or fix its permissions"
    else:
        todo = "check the registry folder and try again"
    where = exc.filename or root
    return (f"could not publish into the registry {root}: {exc.strerror or exc} ({where}); {todo}. The registry's "
            f"index is unchanged")


def check_ensemble_refs(refs, owners, new_ref: str) -> list[str]:
    """Refuse an ensemble that an index would not accept, or that names a model no registry holds
    (``owners``: the ``(name, version)`` pairs the registries hold; ``new_ref`` is being published)."""
    refs = list(refs)
    bad = [r for r in refs if not _is_ref(r) or "@" not in str(r)]
    if not refs or bad:
        raise ManifestError(f"--ensemble {','.join(map(str, refs))!r}: each member must be a model ref like "
                           f"'name@3' (or @new for the version being published), got {bad or refs}; nothing was "
                           f"published")
    missing = [r for r in refs if r != new_ref and (r.partition("@")[0], int(r.partition("@")[2])) not in owners]
    if missing:
        raise ManifestError(f"--ensemble names {', '.join(missing)}, which no registry holds (see lumbarseg models); "
                           f"nothing was published")
    return refs
