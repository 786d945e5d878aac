"""pdserve end to end: real Ray, real Redis, real vLLM engines with the default model.

The key check: greedy output through prefill -> store -> decode is token-for-token the
monolithic engine's, with a cold store, with a warm one, with the store emptied and with
Redis killed. Tests run in file order and share one cluster; the fault tests come last.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster.runtime import pids_titled, serve_replica_pids, start_redis, url_password, wait_until
from kvstore.segment import HEADER_BYTES, SHM_DIR, Segment
from router.tokenizer import PromptTokenizer
from tests.e2e.conftest import Cluster
from tests.e2e.helpers import (
    CHUNK,
    MODEL,
    assert_matches_reference,
    complete_all,
    distinct_long_prompts,
    empty_store,
    n_tokens,
    role_counter,
    store,
    stream_through_a_fault,
)
from tests.e2e.prompts import EQUIVALENCE, FRESH, LONG_PREFIX, SHARED_PREFIX, UNDER_FIRE

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e

# -- correctness, cold and warm ----------------------------------------------------------


def test_cold_store_matches_monolithic_and_decode_loads_from_store(
    cluster: Cluster, reference: dict, tokenizer: PromptTokenizer
) -> None:
    meta = store(cluster)
    loaded_before = role_counter(meta, "decode", "loaded_chunks")
    results = complete_all(cluster, EQUIVALENCE)
    assert sum(n_tokens(tokenizer, p) > 3 * CHUNK for p in EQUIVALENCE) >= 3
    expected_chunks = 0
    for prompt, res in zip(EQUIVALENCE, results, strict=True):
        assert_matches_reference(prompt, res["choices"][0]["token_ids"], reference[prompt])
        n = n_tokens(tokenizer, prompt)
        trace = res["pdserve"]
        assert res["usage"]["prompt_tokens"] == n
        assert 0 < trace["prefill_engine_s"] < 600  # the prefill engine's share of the TTFT
        # decode gets prompt + first token; every full prompt chunk came from the store
        assert trace["decode_cached_tokens"] == n // CHUNK * CHUNK, (prompt[:40], trace)
        if n >= CHUNK:
            assert n + 1 - trace["decode_cached_tokens"] < n  # computed fewer than the prompt
        expected_chunks += n // CHUNK
    assert role_counter(meta, "decode", "loaded_chunks") - loaded_before >= expected_chunks
    assert role_counter(meta, "decode", "load_failures") == 0
    assert role_counter(meta, "prefill", "saved_chunks") > 0


def test_warm_store_matches_monolithic_and_prefill_loads_from_store(
    cluster: Cluster, reference: dict, tokenizer: PromptTokenizer
) -> None:
    results = complete_all(cluster, EQUIVALENCE)
    for prompt, res in zip(EQUIVALENCE, results, strict=True):
        assert_matches_reference(prompt, res["choices"][0]["token_ids"], reference[prompt])
        n = n_tokens(tokenizer, prompt)
        # the engines' own prefix caches are off: the store supplied all but the last chunk
        assert res["pdserve"]["prefill_cached_tokens"] == (n - 1) // CHUNK * CHUNK
        assert res["usage"]["prompt_tokens_details"]["cached_tokens"] == (n - 1) // CHUNK * CHUNK


def test_shared_prefix_is_loaded_on_the_prefill_side(
    cluster: Cluster, reference: dict, tokenizer: PromptTokenizer
) -> None:
    stored = tokenizer.encode(LONG_PREFIX + "Years later, his daughter")
    new = tokenizer.encode(SHARED_PREFIX)
    common = next((i for i, (a, b) in enumerate(zip(stored, new, strict=False)) if a != b), len(new))
    assert common >= 3 * CHUNK
    meta = store(cluster)
    loaded_before = role_counter(meta, "prefill", "loaded_chunks")
    (res,) = complete_all(cluster, [SHARED_PREFIX])
    assert res["pdserve"]["prefill_cached_tokens"] == common // CHUNK * CHUNK
    assert role_counter(meta, "prefill", "loaded_chunks") - loaded_before == common // CHUNK
    assert_matches_reference(SHARED_PREFIX, res["choices"][0]["token_ids"], reference[SHARED_PREFIX])


# -- the API a user sees -------------------------------------------------------------------


def test_openai_sdk_gets_paris_streaming_and_not_from_both_endpoints(cluster: Cluster) -> None:
    client = openai.OpenAI(base_url=cluster.base_url, api_key="unused")
    question = [{"role": "user", "content": "What is the capital of France?"}]
    chat = client.chat.completions.create(model=MODEL, messages=question, max_tokens=20, temperature=0)
    assert chat.choices[0].message.content == "The capital of France is Paris."
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=question, max_tokens=20, temperature=0, stream=True) if c.choices)
    assert streamed == "The capital of France is Paris."
    comp = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert "Paris" in comp.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True))
    assert streamed == comp.choices[0].text
    assert client.models.list().data[0].id == MODEL


def test_sampling_parameters_reach_both_engines(cluster: Cluster) -> None:
    client = openai.OpenAI(base_url=cluster.base_url, api_key="unused")
    question = [{"role": "user", "content": "What is the capital of France?"}]
    # stop: the answer is cut before the stop string, on the decode side
    stopped = client.chat.completions.create(model=MODEL, messages=question, max_tokens=20, temperature=0,
                                             stop=["Paris"])
    assert stopped.choices[0].message.content == "The capital of France is " and \
        stopped.choices[0].finish_reason == "stop"
    # seed: the same seed gives the same sample, through prefill and decode alike
    sampled = [client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12,
                                         temperature=1.0, top_p=0.9, seed=7).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]
    # logprobs: one entry per token, the first from prefill and the rest from decode
    comp = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5,
                                     temperature=0, logprobs=2)
    lp = comp.choices[0].logprobs
    assert lp is not None and len(lp.tokens) == len(lp.token_logprobs) == 5
    assert "".join(lp.tokens) == comp.choices[0].text
    for top, chosen in zip(lp.top_logprobs, lp.token_logprobs, strict=True):  # greedy: chosen is the best
        assert len(top) == 2 and max(top.values()) >= chosen - 1e-6
    chat = client.chat.completions.create(model=MODEL, messages=question, max_tokens=4, temperature=0,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)


def test_real_engine_errors_are_openai_errors(cluster: Cluster) -> None:
    client = openai.OpenAI(base_url=cluster.base_url, api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="word " * 1100, max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=5000)


def test_status_prints_pools_replicas_and_store(cluster: Cluster) -> None:
    complete_all(cluster, [LONG_PREFIX])  # something stored, whatever ran before

    def status(*flags: str) -> str:
        done = subprocess.run([sys.executable, "-m", "cluster.cli", "status", *flags], env=cluster.env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stdout

    raw = json.loads(status("--json"))
    assert raw["app"] == "RUNNING" and raw["url"] == cluster.base_url
    for pool in ("prefill", "decode", "router"):
        assert raw["deployments"][pool]["replicas"] == {"RUNNING": 1}, raw["deployments"]
    live = raw["live"]  # the dashboard's snapshot: replicas as the router sees them, store, latencies
    assert [len(live["pools"][role]) for role in ("decode", "prefill")] == [1, 1], live["pools"]
    assert live["requests"]["requests"] >= 1 and live["requests"]["ttft_s"]["p50"] > 0
    assert len(live["store"]["nodes"]) == 1 and next(iter(live["store"]["nodes"].values()))["chunks"] > 0
    text = status()
    for row in (live["pools"]["prefill"][0]["replica"], live["pools"]["decode"][0]["replica"], "TTFT p50/p90/p99"):
        assert row in text, text


def test_router_serves_the_store_metrics_to_prometheus(cluster: Cluster) -> None:
    r = httpx.get(cluster.base_url.removesuffix("/v1") + "/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {s.name: s.value for f in text_string_to_metric_families(r.text) for s in f.samples}
    assert samples["pdserve_kvstore_up"] == 1
    assert samples["pdserve_kvstore_saved_chunks_total"] > 0 and samples["pdserve_kvstore_segment_chunks"] > 0
    assert samples["pdserve_kvstore_get_seconds_count"] > 0  # decode loaded through the store
    index = httpx.get(cluster.base_url.removesuffix("/v1") + "/debug/store-index", timeout=30).json()
    assert index["feed_healthy"] and index["chunks"] > 0 and index["nodes"] == 1  # the router's own view
    # the router's own metrics: its pools' replicas and the requests it served
    assert samples["pdserve_requests_total"] > 0 and samples["pdserve_request_ttft_seconds_count"] > 0
    assert samples["pdserve_replica_computed_tokens_total"] > 0
    # Every pdserve metric the Grafana dashboard queries (through Ray's export) is one the router serves.
    ours = {name.removeprefix("ray_") for name in grafana_queries() if name.startswith("ray_pdserve_")}
    assert len(ours) >= 15 and ours <= set(samples), sorted(ours - set(samples))


def grafana_queries() -> set[str]:
    dashboard = json.loads((REPO / "deploy/grafana/pdserve.json").read_text())
    return {name for panel in dashboard["panels"] for t in panel["targets"]
            for name in re.findall(r"ray_(?:pdserve|vllm)_[a-z0-9_]+", t["expr"])}


def test_pdserve_and_vllm_metrics_go_out_through_rays_export(cluster: Cluster) -> None:
    """What Ray's Prometheus scrapes (each node's metrics export) carries pdserve's metrics
    and the engines' own, and every metric the Grafana dashboard queries."""
    targets = cluster.state().metrics_targets  # every node's Ray metrics export, as `pdserve up` found them
    assert targets

    def exported() -> set[str]:
        return {s.name for t in targets
                for f in text_string_to_metric_families(httpx.get(f"http://{t}/metrics", timeout=30).text)
                for s in f.samples}

    queried = grafana_queries()
    # Under load: vLLM sets its gauges only while it has outputs, and Ray drops a gauge that
    # has not been set for a while, so an idle engine's queue and KV panels go blank.
    stop = threading.Event()

    def keep_busy() -> None:
        while not stop.is_set():
            complete_all(cluster, [LONG_PREFIX])

    load = threading.Thread(target=keep_busy)
    load.start()
    try:
        deadline = time.monotonic() + 90  # the router exports every 5 s, Ray's agents publish on their own period
        while (missing := queried - (names := exported())) and time.monotonic() < deadline:
            time.sleep(3)
    finally:
        stop.set()
        load.join()
    assert not missing, sorted(missing)
    assert {"ray_pdserve_kvstore_segment_chunks", "ray_pdserve_replica_running", "ray_pdserve_requests_total",
            "ray_vllm_num_requests_running"} <= names
    assert len(queried) >= 20 and queried <= names, sorted(queried - names)


def test_redis_password_is_in_no_log_and_on_no_command_line(cluster: Cluster) -> None:
    """Every part reaches Redis with its password (engines, agents, router: the tests above
    pass through all of them); none of them writes it down where it could be read."""
    state = cluster.state()
    password = url_password(state.redis_url)
    assert password, "pdserve starts its Redis with a password"
    logs = [p for p in (Path(state.ray_temp_dir) / "session_latest" / "logs").rglob("*") if p.is_file()]
    assert len(logs) > 10
    assert not [str(p) for p in logs if password.encode() in p.read_bytes()]
    cmdlines = [p for p in Path("/proc").glob("[0-9]*/cmdline") if p.parent.name.isdigit()]
    leaked = []
    for p in cmdlines:
        try:
            if password.encode() in p.read_bytes():
                leaked.append(p.parent.name)
        except OSError:
            continue
    assert not leaked, f"processes with the password on their command line: {leaked}"


# -- faults: nothing on the KV path may make an answer wrong -------------------------------


def test_emptied_store_recomputes_and_stays_correct(
    cluster: Cluster, reference: dict, tokenizer: PromptTokenizer
) -> None:
    empty_store(cluster)
    prompts = distinct_long_prompts(tokenizer, EQUIVALENCE, CHUNK)
    assert len(prompts) >= 3
    for prompt, res in zip(prompts, complete_all(cluster, prompts, concurrency=1), strict=True):
        assert res["pdserve"]["prefill_cached_tokens"] == 0  # nothing left to load: recomputed
        assert res["pdserve"]["decode_cached_tokens"] == n_tokens(tokenizer, prompt) // CHUNK * CHUNK
        assert_matches_reference(prompt, res["choices"][0]["token_ids"], reference[prompt])


def test_corrupted_chunks_fail_their_checksum_are_recomputed_and_dropped(
    cluster: Cluster, reference: dict, tokenizer: PromptTokenizer
) -> None:
    meta = store(cluster)
    stored = [kl for agent in meta.agents() for kl in meta.node_chunks(agent.node_id)]
    assert stored, "the tests before this one leave chunks in the store"
    for _key, loc in stored:  # damage one byte of every stored chunk, headers left intact
        seg = Segment.attach(loc.segment)
        seg.buf[loc.offset + HEADER_BYTES + loc.length // 2] ^= 0x5A
        seg.close()
    failures_before = role_counter(meta, "prefill", "checksum_failures")
    prompts = [p for p in EQUIVALENCE if n_tokens(tokenizer, p) > 2 * CHUNK][:4]
    for prompt, res in zip(prompts, complete_all(cluster, prompts, concurrency=1), strict=True):
        assert_matches_reference(prompt, res["choices"][0]["token_ids"], reference[prompt])
    assert role_counter(meta, "prefill", "checksum_failures") > failures_before
    # Every damaged chunk that a reader met is gone from the store (or replaced by a good copy).
    locs_now = meta.lookup([k for k, _ in stored])
    met = [(k, loc) for (k, loc), now in zip(stored, locs_now, strict=True) if now != loc]
    assert met, "no damaged chunk was dropped"


def test_killed_redis_recomputes_and_stays_correct_then_the_store_heals(
    cluster: Cluster, reference: dict, tokenizer: PromptTokenizer
) -> None:
    state = cluster.state()
    subprocess.run(["kill", f"-{signal.SIGKILL.value}", str(state.redis_pid)], check=True)
    wait_until(lambda: not Path(f"/proc/{state.redis_pid}").exists(), 10, "redis to die")
    for prompt, res in zip(FRESH[:2], complete_all(cluster, FRESH[:2], concurrency=1), strict=True):
        assert res["pdserve"]["prefill_cached_tokens"] == 0 and res["pdserve"]["decode_cached_tokens"] == 0
        assert_matches_reference(prompt, res["choices"][0]["token_ids"], reference[prompt])
    # Bring Redis back on the same port (empty): agents re-register, the store works again.
    _url, _port, state.redis_pid = start_redis(cluster.home / "run", port=state.redis_port,
                                               password=url_password(state.redis_url))
    state.save(cluster.home)  # so `down` stops it
    wait_until(lambda: store(cluster).agents(), 15, "agents to re-register")
    # Healed: the first request after that is saved by prefill and loaded by decode again.
    # (A prompt the model answers past its first token, or decode never runs.)
    prompt = next(p for p in FRESH if len(reference[p]["token_ids"]) > 1 and n_tokens(tokenizer, p) > CHUNK)
    (res,) = complete_all(cluster, [prompt])
    assert_matches_reference(prompt, res["choices"][0]["token_ids"], reference[prompt])
    want = n_tokens(tokenizer, prompt) // CHUNK * CHUNK
    assert res["pdserve"]["decode_cached_tokens"] == want > 0, (res["pdserve"], store(cluster).stats())


def test_killed_store_agent_costs_nothing_and_a_new_agent_takes_over(
    cluster: Cluster, reference: dict, tokenizer: PromptTokenizer
) -> None:
    """The node's store agent is SIGKILLed. Serving goes on (a save that cannot reach it is
    skipped, a load it cannot serve recomputed); the supervisor starts a new agent on the
    node within seconds, which unlinks the dead one's segment and drops its chunks from the
    metadata; the prompts after that are saved and loaded through the new agent."""
    meta = store(cluster)
    (old,) = meta.agents()
    (pid,) = pids_titled("ray::StoreAgentActor")
    subprocess.run(["kill", f"-{signal.SIGKILL.value}", str(pid)], check=True)
    prompts = [p for p in EQUIVALENCE if n_tokens(tokenizer, p) > CHUNK and len(reference[p]["token_ids"]) > 1][:3]
    for prompt, res in zip(prompts, complete_all(cluster, prompts, concurrency=1), strict=True):
        assert_matches_reference(prompt, res["choices"][0]["token_ids"], reference[prompt])

    def taken_over() -> bool:
        agents = meta.agents()
        return len(agents) == 1 and agents[0].segment != old.segment

    wait_until(taken_over, 60, "the supervisor to start a new store agent on the node")
    (new,) = meta.agents()
    assert not Path(SHM_DIR, old.segment).exists()  # the dead agent's segment, unlinked
    assert all(loc.segment == new.segment for _k, loc in meta.node_chunks(new.node_id))
    # Healed: a prompt not seen before is saved by prefill and loaded by decode again.
    prompt = next(p for p in reversed(FRESH) if len(reference[p]["token_ids"]) > 1 and n_tokens(tokenizer, p) > CHUNK)
    (res,) = complete_all(cluster, [prompt])
    assert_matches_reference(prompt, res["choices"][0]["token_ids"], reference[prompt])
    assert res["pdserve"]["decode_cached_tokens"] == n_tokens(tokenizer, prompt) // CHUNK * CHUNK > 0


# -- replica faults: a lost engine replica costs the client nothing ---------------------------


def pool_rows(cluster: Cluster, role: str) -> list[dict]:
    base = cluster.base_url.removesuffix("/v1")
    return list(httpx.get(f"{base}/dashboard/data", timeout=30).json()["pools"].get(role, []))


def kill_replica(cluster: Cluster, role: str) -> str:
    """SIGKILL the pool's one replica process; its name, for checking that Serve replaced it."""
    (name,) = [r["replica"] for r in pool_rows(cluster, role)]
    (pid,) = serve_replica_pids("pdserve", role)
    subprocess.run(["kill", f"-{signal.SIGKILL.value}", str(pid)], check=True)
    return str(name)


def wait_replaced(cluster: Cluster, role: str, dead: str) -> None:
    def back() -> bool:
        rows = pool_rows(cluster, role)
        return len(rows) == 1 and rows[0]["replica"] != dead and len(serve_replica_pids("pdserve", role)) == 1

    wait_until(back, 300, f"Serve to replace the killed {role} replica")


def test_prefill_replica_killed_under_load_loses_nothing_and_outputs_stay_equal(
    cluster: Cluster, reference: dict, tokenizer: PromptTokenizer
) -> None:
    """Six long prompts (seconds of prefill work) sent at once, then the prefill pool's only
    replica is killed while it computes them: every request is retried (on its replacement)
    and answers exactly as monolithic vLLM."""
    results: list[dict] = []
    sender = threading.Thread(target=lambda: results.extend(complete_all(cluster, UNDER_FIRE, concurrency=6)))
    sender.start()
    base = cluster.base_url.removesuffix("/v1")
    wait_until(lambda: any(r["queued_tokens"] or r["running"] for r in pool_rows(cluster, "prefill")), 30,
               "the prompts to reach the prefill engine")
    dead = kill_replica(cluster, "prefill")
    sender.join(timeout=600)
    assert not sender.is_alive() and len(results) == len(UNDER_FIRE)
    for prompt, res in zip(UNDER_FIRE, results, strict=True):
        assert_matches_reference(prompt, res["choices"][0]["token_ids"], reference[prompt])
    assert sum(r["pdserve"]["prefill_retries"] for r in results) >= 1
    wait_replaced(cluster, "prefill", dead)
    metrics = httpx.get(f"{base}/metrics", timeout=30).text
    assert re.search(r"^pdserve_prefill_retries_total [1-9]", metrics, re.M), metrics[-2000:]


def test_decode_replica_killed_mid_stream_resumes_with_no_token_lost_or_repeated(cluster: Cluster) -> None:
    """A long greedy stream; the decode pool's only replica is killed after 16 tokens. The
    client's stream goes on (from the replacement, which loads the prompt's KV from the store)
    and is the uninterrupted stream's, token for token."""
    dead = stream_through_a_fault(cluster, FRESH[0], lambda: kill_replica(cluster, "decode"))
    wait_replaced(cluster, "decode", dead)


def test_decode_streams_messages_of_its_stream_interval(cluster: Cluster) -> None:
    """The e2e decode engine sends 2 tokens a message (tests/e2e/cluster.yaml): the stream
    carries messages of at most 2 tokens, most of them 2, and exactly the tokens of the same
    completion unstreamed."""
    body = {"model": MODEL, "prompt": EQUIVALENCE[0], "max_tokens": 25, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    whole = httpx.post(f"{cluster.base_url}/completions", json=body, timeout=300).json()["choices"][0]["token_ids"]
    sizes: list[int] = []
    got: list[int] = []
    with httpx.stream("POST", f"{cluster.base_url}/completions", json={**body, "stream": True}, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                ids = [t for c in json.loads(line[6:])["choices"] for t in (c.get("token_ids") or [])]
                if ids:
                    sizes.append(len(ids))
                    got += ids
    assert got == whole and len(got) == 25
    # the first token comes from prefill and the decode engine's first at once; then pairs
    assert max(sizes) == 2 and sizes.count(2) >= 10, sizes


def test_client_that_disconnects_is_aborted_on_both_engines_and_its_kv_freed(cluster: Cluster) -> None:
    body = {"model": MODEL, "prompt": FRESH[1], "max_tokens": 600, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", f"{cluster.base_url}/completions", json=body, timeout=300) as r:
        events = 0
        for line in r.iter_lines():
            events += line.startswith("data: ")
            if events == 8:
                wait_until(lambda: sum(r["running"] for r in pool_rows(cluster, "decode")) == 1, 10,
                           "the stream to run on the decode engine")
                break  # the client goes away with ~590 tokens (many seconds) still to come

    def idle() -> bool:
        rows = pool_rows(cluster, "prefill") + pool_rows(cluster, "decode")
        return all(r["running"] == 0 and r["waiting"] == 0 and r["kv_usage"] == 0 for r in rows)

    wait_until(idle, 5, "both engines to abort the request and free its KV")
