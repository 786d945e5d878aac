"""API keys (router/auth.py, cluster/auth.py): which requests get in, and which configs are
refused before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.auth import api_key_digests, is_loopback
from cluster.config import RouterConfig
from router.auth import ApiKeys, key_digest
from router.errors import Unauthorized


def test_only_a_bearer_with_an_accepted_key_gets_in() -> None:
    keys = ApiKeys([key_digest("k-one"), key_digest("k-two")])
    keys.check("Bearer k-two")
    keys.check("bearer  k-one ")  # scheme case and spaces as clients send them
    for header in (None, "", "Bearer", "Bearer ", "Basic k-one", "k-one", "Bearer k-three", "Bearer K-ONE"):
        with pytest.raises(Unauthorized) as e:
            keys.check(header)
        assert e.value.status == 401 and e.value.code == "invalid_api_key" and "k-" not in e.value.message


def test_keys_guard_the_api_and_debug_paths_only() -> None:
    keys = ApiKeys([key_digest("k")])
    assert keys.guards("/v1/completions") and keys.guards("/v1/models") and keys.guards("/debug/routes")
    assert not any(keys.guards(p) for p in ("/health", "/metrics", "/dashboard", "/dashboard/data"))
    assert not ApiKeys().guards("/v1/completions")  # no keys: open


def test_an_open_router_beyond_loopback_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PDSERVE_API_KEYS", raising=False)
    assert api_key_digests(RouterConfig(host="127.0.0.1")) == []
    with pytest.raises(ValueError, match="reachable beyond this machine.*PDSERVE_API_KEYS"):
        api_key_digests(RouterConfig(host="0.0.0.0"))
    with pytest.raises(ValueError, match="router.auth is required"):
        api_key_digests(RouterConfig(auth="required"))
    assert api_key_digests(RouterConfig(host="0.0.0.0", auth="off")) == []
    monkeypatch.setenv("PDSERVE_API_KEYS", "alpha, beta")
    f = tmp_path / "keys"
    f.write_text("# the ops team\ngamma\n\n")
    got = api_key_digests(RouterConfig(host="0.0.0.0", api_keys_file=str(f)))
    assert got == [key_digest(k) for k in ("alpha", "beta", "gamma")]
    assert not any(k in "".join(got) for k in ("alpha", "beta", "gamma"))  # digests only leave this process
    with pytest.raises(ValueError, match="api_keys_file"):
        api_key_digests(RouterConfig(api_keys_file=str(tmp_path / "missing")))


def test_loopback_hosts() -> None:
    assert all(map(is_loopback, ("127.0.0.1", "127.0.0.5", "::1", "localhost")))
    assert not any(map(is_loopback, ("0.0.0.0", "::", "10.0.0.1", "router.example")))
