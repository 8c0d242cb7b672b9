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
  # Install the PyTorch build for your platform first; the CPU build is used here. A plain `torch`
  # requirement would pull a multi-GB CUDA build. For a GPU: https://pytorch.org/get-started/locally/
  "$PY" -m pip install -q "torch==${LUMBARSEG_TORCH:-2.13.0}"
fi
if ! "$PY" -c "import LumbarSegmentLib, slicer, pytest" 2>/dev/null; then
  "$PY" -m pip install -q -e "$ROOT[test]"
fi
export PATH="$VENV/bin:$PATH"
