#!/usr/bin/env bash
# Install what is missing, then run the whole test suite: lint, unit, integration, e2e.
# Extra arguments go to pytest (e.g. tests/unit -x).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/ensure.sh"
cd "$ROOT"
# The dashboard's test renders the page in Debian's Chromium, headless.
if ! command -v chromium >/dev/null 2>&1; then
  say "installing chromium (apt; the dashboard's browser test)"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
# The `ray up` test reaches this machine over SSH: an sshd of its own on loopback, rsync for file_mounts.
if [ ! -x /usr/sbin/sshd ] || ! command -v rsync >/dev/null 2>&1; then
  say "installing openssh-server and rsync (apt; the ray up test)"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends openssh-server rsync >/dev/null
fi
"$VENV/bin/ruff" check .
exec "$VENV/bin/python" -m pytest "${@:-tests}"
