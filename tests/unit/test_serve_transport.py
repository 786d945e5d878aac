"""``router.serve_transport``: the router's engine handles carry it per handle, and Serve's
controller options carry it to the HTTP proxies (checked live in
tests/integration/test_token_channel.py)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from cluster.app import controller_options
from cluster.config import ClusterConfig
from router.app import over_transport


class RecordingHandle:
    """Stands in for a DeploymentHandle: what ``options`` was called with."""

    def __init__(self) -> None:
        self.options_seen: dict[str, Any] = {}

    def options(self, **kw: Any) -> RecordingHandle:
        self.options_seen.update(kw)
        return self


@pytest.mark.parametrize(("transport", "by_reference"), [("grpc", False), ("ray", True)])
def test_engine_handles_say_their_transport_whatever_the_process_default(transport: str, by_reference: bool) -> None:
    handle = RecordingHandle()
    assert over_transport(handle, transport) is handle  # type: ignore[arg-type]
    assert handle.options_seen == {"_by_reference": by_reference}


def test_an_unknown_transport_is_refused() -> None:
    with pytest.raises(ValueError, match="serve_transport"):
        over_transport(RecordingHandle(), "http")  # type: ignore[arg-type]


def test_grpc_reaches_the_proxies_through_the_controllers_environment() -> None:
    assert controller_options("grpc") == {"runtime_env": {"env_vars": {"RAY_SERVE_USE_GRPC_BY_DEFAULT": "1"}}}
    assert controller_options("ray") == {}


def test_the_config_defaults_to_grpc_and_takes_only_the_two() -> None:
    assert ClusterConfig().router.serve_transport == "grpc"
    assert ClusterConfig.model_validate({"router": {"serve_transport": "ray"}}).router.serve_transport == "ray"
    with pytest.raises(ValidationError):
        ClusterConfig.model_validate({"router": {"serve_transport": "http"}})
