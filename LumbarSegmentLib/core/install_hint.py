"""How to add an optional extra (``[web]``) to the LumbarSegment that is installed here.

``pip install 'lumbarsegment[web]'`` would look the name up in a package index, which is not
where a wheel someone was handed came from. pip records where an install came from
(``direct_url.json``, PEP 610): when that is a wheel file, the hint names that very file; from a
source checkout it is the editable install; otherwise the extra's packages are listed.
"""
from __future__ import annotations

import json
from urllib.parse import unquote, urlparse

WEB_PACKAGES = "slicer-core==5.11.0.6 slicer-layer-dm==2.0.0 trame-slicer==2.0.0"  # pyproject's [web] extra


def installed_from() -> tuple[str, str] | None:
    """``("wheel", path)`` or ``("source", folder)`` where pip recorded it, else ``None``."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        text = distribution("lumbarsegment").read_text("direct_url.json")
    except (PackageNotFoundError, OSError):
        return None
    try:
        info = json.loads(text or "")
    except ValueError:
        return None
    url = urlparse(str(info.get("url", "")))
    if url.scheme != "file":
        return None
    path = unquote(url.path)
    if path.endswith(".whl"):
        return "wheel", path
    if (info.get("dir_info") or {}).get("editable") or path:
        return "source", path
    return None


def extra_install_hint(extra: str = "web", packages: str = WEB_PACKAGES) -> str:
    """One clause telling how to add ``[extra]`` to this environment."""
    where = installed_from()
    if where and where[0] == "wheel":
        return f"add it to this environment with pip install '{where[1]}[{extra}]' (the wheel you installed)"
    if where and where[0] == "source":
        return f"add it to this environment with pip install -e '{where[1]}[{extra}]' (your source checkout)"
    return (f"add it to this environment with pip install '<the lumbarsegment wheel file>[{extra}]', "
            f"pip install -e '.[{extra}]' in a source checkout, or pip install {packages}")


__all__ = ["extra_install_hint", "installed_from", "WEB_PACKAGES"]
