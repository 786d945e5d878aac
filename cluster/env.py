"""The one place environment variables are read. All of them use the PDSERVE_ prefix."""

from __future__ import annotations

import os
from pathlib import Path


def pdserve_home() -> Path:
    """Cache and state directory (models, run state): $PDSERVE_HOME, else ~/.cache/pdserve."""
    raw = os.environ.get("PDSERVE_HOME", "").strip()
    return Path(raw).expanduser() if raw else Path.home() / ".cache" / "pdserve"
