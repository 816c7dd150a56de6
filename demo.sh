#!/usr/bin/env bash
# Run the vizcnn demo (creates .venv on the first run). Extra arguments go to the command.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_venv.sh
vizcnn summary torchvision:alexnet "$@"
