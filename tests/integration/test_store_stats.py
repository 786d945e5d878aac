"""The store's stats: one ``collect`` call over Redis counters and every agent, and the same
numbers as well-formed Prometheus text."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from kvstore.client import ChunkToSave, StoreClient
from kvstore.peer_auth import PeerAuth
from kvstore.segment import HEADER_BYTES
from kvstore.stats import collect, render_prometheus

from .conftest import AgentFactory
from .test_transport_contract import content, make_key


def test_collect_and_prometheus_export(make_agent: AgentFactory, redis_url: str, prefix: str) -> None:
    make_agent("node-A")
    local, remote = StoreClient(redis_url, prefix, "node-A"), StoreClient(redis_url, prefix, "node-B")
    keys = [make_key("stats", i) for i in range(3)]
    local.batch_put([ChunkToSave(k, 4096) for k in keys],
                    lambda i, v: v.__setitem__(slice(None), content(keys[i], 4096)))
    locs = [loc for loc in local.lookup(keys) if loc]
    assert all(local.batch_get(keys, locs, lambda i, p: None))
    assert all(remote.batch_get(keys[:2], locs[:2], lambda i, p: None))
    local.meta.add_counters("engine-a", local.drain_counters(), 0.0)
    remote.meta.add_counters("engine-b", remote.drain_counters(), 0.0)

    stats = collect(local.meta, PeerAuth.for_store(redis_url, prefix))
    assert stats.totals["loaded_local_chunks"] == 3 and stats.totals["loaded_remote_chunks"] == 2
    assert stats.instances["engine-b"]["bytes_in_tcp"] == 2 * (HEADER_BYTES + 4096)
    node = stats.nodes["node-A"]
    assert node["chunks"] == 3 and node["bytes_out_tcp"] == 2 * (HEADER_BYTES + 4096) and node["remote_reads"] == 2

    families = {f.name: f for f in text_string_to_metric_families(render_prometheus(stats))}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("pdserve_kvstore_up", ())] == 1
    assert samples[("pdserve_kvstore_loaded_chunks_total", (("source", "remote"),))] == 2
    assert samples[("pdserve_kvstore_segment_chunks", (("node", "node-A"),))] == 3
    assert samples[("pdserve_kvstore_get_seconds_count", (("transport", "tcp"),))] == 1
    assert samples[("pdserve_kvstore_get_seconds_bucket", (("le", "+Inf"), ("transport", "shm")))] == 1
    assert families["pdserve_kvstore_get_seconds"].type == "histogram"
    down = {f.name: f for f in text_string_to_metric_families(render_prometheus(None))}
    assert down["pdserve_kvstore_up"].samples[0].value == 0
    local.close()
    remote.close()
