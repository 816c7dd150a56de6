#!/usr/bin/env bash
# Create .venv with everything vizcnn needs, unless it is already there and up to date; safe to
# run again (an interrupted install is redone). Run it, or source it (demo.sh and test.sh do):
# sourced, it also puts .venv/bin first on PATH and changes nothing else in the caller's shell,
# because the set-up runs in a child bash with its own options.
# Quantus (the tests' independent answer for the sanity checks) installs without its declared
# dependencies: it asks for opencv-python, which would overwrite the cv2 of vizcnn's
# opencv-python-headless; its other needs (pandas, cachetools, scikit-learn) are in [test].
if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then
  if bash "${BASH_SOURCE[0]}"; then
    PATH="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv/bin:$PATH"
    export PATH
    return 0
  fi
  return 1
fi
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.vizcnn-installed"
want="$(cat "$root/pyproject.toml" "$root/scripts/ensure_venv.sh" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setting up $venv (first run only; about a minute) ..." >&2
  python=${PYTHON:-python3.11}
  command -v "$python" >/dev/null || python=python3
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
  log="$venv/install.log"
  if ! { "$venv/bin/python" -m pip install torch==2.14.1 torchvision==0.29.1 \
         && "$venv/bin/python" -m pip install -e "$root[test,docs]" \
         && "$venv/bin/python" -m pip install --no-deps "quantus>=0.6" \
         && "$venv/bin/python" -c "import vizcnn, torch, captum, cv2, quantus"; } >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "set-up failed; the whole log is in $log" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi
