#!/usr/bin/env bash
# Create ./.venv (once) with the CPU build of PyTorch and LumbarSegment (editable) plus test extras.
# Sourced by demo.sh and test.sh; safe to run again (it only installs what is missing).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LUMBARSEG_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q --upgrade pip
  # PyTorch first, the build for this platform. On Linux the default index serves a multi-GB CUDA
  # build, so the CPU index is named there unless LUMBARSEG_TORCH_INDEX says otherwise (a CUDA index
  # such as https://download.pytorch.org/whl/cu128, or "default"); macOS wheels are CPU/MPS builds.
  # Wheels of torch 2.13 exist for Python 3.10+ (pyproject's requires-python; checked by the tests).
  TORCH_INDEX="${LUMBARSEG_TORCH_INDEX:-}"
  if [ -z "$TORCH_INDEX" ] && [ "$(uname -s)" = "Linux" ]; then
    TORCH_INDEX="https://download.pytorch.org/whl/cpu"
  fi
  if [ -n "$TORCH_INDEX" ] && [ "$TORCH_INDEX" != "default" ]; then
    # few retries: on a machine that cannot reach that index (an offline mirror, a sandbox), pip's
    # configured local wheels answer at once instead of after minutes of back-off
    "$PY" -m pip install -q --retries 1 --timeout 20 "torch==${LUMBARSEG_TORCH:-2.13.0}" --index-url "$TORCH_INDEX"
  else
    "$PY" -m pip install -q "torch==${LUMBARSEG_TORCH:-2.13.0}"
  fi
fi
# The test and web extras (the browser front end and its Chromium tests via Playwright). Reinstalls
# when a venv still holds another slicer-core than pyproject's pin (5.11.0.6, see pyproject.toml), or
# when its command entry points no longer load (a checkout whose modules moved since the install).
if ! "$PY" -c "import LumbarSegmentLib, LumbarSegmentWeb, slicer, pytest, xdist, onnxruntime, onnx, trame_slicer, playwright
from importlib.metadata import version, entry_points; assert version('slicer-core') == '5.11.0.6'
[e.load() for e in entry_points(group='console_scripts') if e.name in ('lumbarseg', 'lumbarseg-train')]" 2>/dev/null; then
  "$PY" -m pip install -q -e "$ROOT[test,web]" playwright
fi
export PATH="$VENV/bin:$PATH"
