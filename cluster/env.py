"""The one place environment variables are read. All of them use the PDSERVE_ prefix."""

from __future__ import annotations

import os
from pathlib import Path


def pdserve_home() -> Path:
    """Cache and state directory (models, run state): $PDSERVE_HOME, else ~/.cache/pdserve."""
    raw = os.environ.get("PDSERVE_HOME", "").strip()
    return Path(raw).expanduser() if raw else Path.home() / ".cache" / "pdserve"


def pin_ray_auth_mode() -> str:
    """Choose Ray's auth mode once, for both `ray start` and `ray.init(address=...)`.

    Ray 2.60 turns token auth on for `ray start --head` whenever a token file exists (any
    earlier plain `ray.init()` on the host writes one), but `ray.init` with an explicit
    address never does, so our own driver is then refused by our own head. An explicit
    RAY_AUTH_MODE is respected by both: token auth when a token is available, else off.
    """
    mode = os.environ.get("RAY_AUTH_MODE", "").strip()
    if not mode:
        token_path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")).expanduser()
        mode = "token" if os.environ.get("RAY_AUTH_TOKEN") or token_path.is_file() else "disabled"
        os.environ["RAY_AUTH_MODE"] = mode
    return mode


def api_keys_from_env() -> list[str]:
    """API keys the router accepts, from $PDSERVE_API_KEYS (comma-separated)."""
    return [k.strip() for k in os.environ.get("PDSERVE_API_KEYS", "").split(",") if k.strip()]
