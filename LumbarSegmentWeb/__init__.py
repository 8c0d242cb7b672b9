"""LumbarSegmentWeb: the browser front end (``lumbarseg web``), a thin shell over LumbarSegmentLib.

Why a package of its own: the Lib must never import trame (see docs/architecture.md);
this package imports the Lib, never the other way round, and is installed with the
``[web]`` extra (added to an installed wheel with ``pip install 'WHEEL_FILE[web]'``).

* :mod:`.session` — one annotator's work without any web server: the MRML scene of
  trame-slicer, the Lib's background segmentation/retraining controllers, effects,
  undo, export. The API-level tests drive this directly.
* :mod:`.worklist` — the cases of ``--data`` with their state (new, drafted,
  corrected, exported), and "next case".
* :mod:`.app` — the trame page bound to a session; :mod:`.serve` — command line
  options, the access token, start-up checks, and the server start.
* :mod:`.guard` and :mod:`.socket_guard` — what the server accepts over HTTP and its
  WebSocket (Host, Origin, token, per-run key, message sizes, no exit on a client's
  word); the policy is docs/threat_model.md.

One process serves one annotator: the scene, the undo history and the running jobs
live in that process. Run one ``lumbarseg web`` per person (each on its own port).
"""
from __future__ import annotations

import os

# Offscreen rendering without X: VTK picks EGL (Mesa's llvmpipe when there is no GPU).
# Set before VTK creates its first render window, i.e. before trame_slicer is imported.
os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

def install_hint() -> str:
    """How to add the [web] extra to the installed LumbarSegment (the wheel file it came from, if known)."""
    from LumbarSegmentLib.core.install_hint import extra_install_hint

    return f"the browser front end needs the [web] extra; {extra_install_hint('web')}"


def missing_dependency() -> str | None:
    """Why ``lumbarseg web`` cannot start here (a missing package), or ``None`` when it can."""
    import importlib.util

    for module, package in (("trame_slicer", "trame-slicer"), ("trame", "trame"), ("slicer", "slicer-core"),
                            ("LayerDMLib", "slicer-layer-dm")):
        if importlib.util.find_spec(module) is None:
            return f"{package} is not installed; {install_hint()}"
    return None
