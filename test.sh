#!/usr/bin/env bash
# Run vizcnn's tests and lint (creates .venv on the first run). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_venv.sh
ruff check .
python -m pytest -q "$@"
