#!/usr/bin/env bash
# Build vizcnn's documentation site into site/ (creates .venv on the first run); offline and
# strict: a broken link or an example that raises fails the build. Open site/index.html.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/ensure_venv.sh
# Material prints a banner about its end of life (May 2027; docs/building.md) on each build
export NO_MKDOCS_2_WARNING=1
mkdocs build --strict "$@"  # not --quiet: in MkDocs 1.6 it turns off --strict
echo "the site is in $(pwd)/site: open $(pwd)/site/index.html"
