#!/usr/bin/env bash
# Run the vizcnn demo (creates .venv on the first run): figures and a report of the bundled
# demo network in demo-out/ (or the folder given with --out).
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_venv.sh
vizcnn demo "$@"
