#!/usr/bin/env bash
# Install what is missing, then run the whole test suite: lint, unit, integration, e2e.
# Extra arguments go to pytest (e.g. tests/unit -x).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/ensure.sh"
cd "$ROOT"
"$VENV/bin/ruff" check .
exec "$VENV/bin/python" -m pytest "${@:-tests}"
