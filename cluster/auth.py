"""Which API keys the router accepts, resolved once at ``pdserve up`` before anything starts:
a router reachable beyond this machine without a key is refused, not started."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from cluster.config import RouterConfig
from cluster.env import api_keys_from_env
from router.auth import key_digest


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def api_key_digests(cfg: RouterConfig) -> list[str]:
    """SHA-256 digests of the keys from $PDSERVE_API_KEYS and ``api_keys_file`` (the router
    gets only these); raises ValueError when keys are required and there are none."""
    if cfg.auth == "off":
        return []
    keys = api_keys_from_env()
    if cfg.api_keys_file:
        path = Path(cfg.api_keys_file).expanduser()
        try:
            lines = path.read_text().splitlines()
        except OSError as e:
            raise ValueError(f"router.api_keys_file {path}: {e.strerror or e}") from e
        keys += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    required = cfg.auth == "required" or not is_loopback(cfg.host)
    if required and not keys:
        why = "router.auth is required" if cfg.auth == "required" else \
            f"router.host {cfg.host} is reachable beyond this machine"
        raise ValueError(f"{why} and no API key is set: put keys in PDSERVE_API_KEYS (comma-separated) or "
                         "in router.api_keys_file (one per line), or set router.auth=off to serve without keys")
    return [key_digest(k) for k in keys]
