"""The README's set-up: sourcing scripts/ensure_venv.sh leaves the caller's shell as it was."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_sourcing_ensure_venv_keeps_the_callers_shell_options():
    # an interactive user's shell: no errexit, no nounset, no pipefail
    script = ('set +euo pipefail; before="$-$(set -o | grep pipefail)"; '
              'source scripts/ensure_venv.sh; status=$?; '
              'after="$-$(set -o | grep pipefail)"; '
              'false; echo "alive $status [$before] [$after] $(command -v vizcnn)"')
    result = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith("alive 0 "), result.stdout + result.stderr
    before, after = line.split("[")[1].rstrip("] "), line.split("[")[2].split("]")[0]
    assert before == after
    assert line.endswith(str(ROOT / ".venv" / "bin" / "vizcnn"))
