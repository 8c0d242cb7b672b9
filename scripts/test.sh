#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
. "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
# Two workers, each taking whole test files (the browser tests of one file share a page and run in
# order); LUMBARSEG_TEST_WORKERS=0 runs everything in this one process.
python -m pytest -q -n "${LUMBARSEG_TEST_WORKERS:-2}" --dist loadfile "$@"
