#!/usr/bin/env bash
# Install what is missing, then start a pdserve cluster on the default model and print the
# OpenAI base URL. Extra arguments go to `pdserve up` (e.g. --config deploy/examples/cpu-2core.yaml).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/ensure.sh"
exec "$VENV/bin/pdserve" up "$@"
