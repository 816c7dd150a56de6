#!/usr/bin/env bash
# Run vizcnn's tests and lint (creates .venv on the first run). Extra arguments go to pytest.
# The tests run in two processes (pytest-xdist, a test file per process), one per core;
# VIZCNN_TEST_WORKERS=0 runs them in this one.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_venv.sh
ruff check .
python -m pytest -q -n "${VIZCNN_TEST_WORKERS:-2}" --dist loadfile "$@"
