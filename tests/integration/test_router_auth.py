"""API keys through real Ray Serve (fake engines: the engines are not the subject): the API
answers 401 in OpenAI's error shape without a good key and serves with one; probes and
metrics stay open; and no key, accepted or refused, reaches any log of the session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import ray

from router.auth import key_digest

from .fakes import MODEL, router_with_fakes

GOOD, BAD = "pdk-good-5f0c2a9e", "pdk-bad-77d1b3c4"


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    spec = {"default_max_tokens": 4, "api_key_digests": [key_digest(GOOD)]}
    with router_with_fakes("pdserve-auth-test", spec) as url:
        yield url


BODY = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 3}


def test_the_api_needs_a_good_key_and_says_so_in_openais_shape(base_url: str) -> None:
    for headers in ({}, {"authorization": f"Bearer {BAD}"}, {"authorization": GOOD}):
        r = httpx.post(base_url + "/v1/completions", json=BODY, headers=headers, timeout=30)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
        err = r.json()["error"]
        assert err["type"] == "authentication_error" and err["code"] == "invalid_api_key"
        assert GOOD not in r.text and BAD not in r.text
    assert httpx.get(base_url + "/v1/models", timeout=30).status_code == 401
    assert httpx.get(base_url + "/debug/routes", timeout=30).status_code == 401
    good = {"authorization": f"Bearer {GOOD}"}
    r = httpx.post(base_url + "/v1/completions", json=BODY, headers=good, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["text"]
    with httpx.stream("POST", base_url + "/v1/completions", json={**BODY, "stream": True}, headers=good,
                      timeout=30) as s:
        assert s.status_code == 200 and "[DONE]" in "".join(s.iter_text())
    assert httpx.get(base_url + "/v1/models", headers=good, timeout=30).json()["data"][0]["id"] == MODEL
    for open_path in ("/health", "/metrics", "/dashboard"):
        assert httpx.get(base_url + open_path, timeout=30).status_code == 200, open_path


def test_no_key_reaches_a_log(base_url: str) -> None:
    for key in (GOOD, BAD):  # both seen by the router, once more
        httpx.post(base_url + "/v1/completions", json=BODY, headers={"authorization": f"Bearer {key}"}, timeout=30)
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())  # this session's, every process
    files = [p for p in logs.rglob("*") if p.is_file()]
    assert len(files) > 5, logs
    leaked = [str(p) for p in files if GOOD.encode() in p.read_bytes() or BAD.encode() in p.read_bytes()]
    assert not leaked
