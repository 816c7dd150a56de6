#!/usr/bin/env bash
# Build vizcnn's documentation site into site/ (creates .venv on the first run); offline and
# strict: a broken link or an example that raises fails the build. Open site/index.html.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_venv.sh
mkdocs build --strict --quiet "$@"
echo "the site is in $(pwd)/site: open $(pwd)/site/index.html"
