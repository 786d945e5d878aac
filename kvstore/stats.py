"""The store's numbers in one place: ``collect`` gathers them, ``render_prometheus`` exports them.

Two sources, because the store has two kinds of actors:

- engine clients (``StoreClient`` inside each vLLM engine) count hits, misses, bytes pulled
  per transport, checksum failures and transfer latency, and flush those counters into Redis
  hashes every engine step (``{prefix}:stats`` for totals, ``{prefix}:stats:<instance>``);
- agents own the segments: fill, chunks, pins, evictions, expiries, bytes they served,
  returned by their ``Stats`` call.

Histograms travel as plain counters (``get_seconds:<transport>_bucket:<le>``, ``..._count``,
``..._sum_us``; see ``client.histogram_fields``) so they add up across engines in Redis.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from kvstore.agent_rpc import AgentClient, AgentUnavailable
from kvstore.client import LATENCY_BUCKETS
from kvstore.metadata import MetadataStore
from kvstore.peer_auth import PeerAuth


@dataclass
class StoreStats:
    totals: dict[str, int] = field(default_factory=dict)  # summed over every engine and agent
    instances: dict[str, dict[str, int]] = field(default_factory=dict)  # per engine instance
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)  # per node: its agent's stats

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def collect(meta: MetadataStore, auth: PeerAuth, timeout_s: float = 1.0) -> StoreStats:
    """A snapshot of the whole store (one Redis scan, one Stats call per agent). An agent that
    does not answer is reported as ``{"unreachable": 1}`` rather than failing the snapshot."""
    out = StoreStats(totals=meta.stats())
    for name in meta.client.scan_iter(f"{meta.prefix}:stats:*", count=1000):
        instance = name.decode().removeprefix(f"{meta.prefix}:stats:")
        out.instances[instance] = meta.stats(instance)
    for info in meta.agents():
        client = AgentClient(info.address, auth, timeout_s)
        try:
            out.nodes[info.node_id] = {**asdict(client.stats()), "address": info.address}
        except AgentUnavailable:
            out.nodes[info.node_id] = {"unreachable": 1, "address": info.address}
        finally:
            client.close()
    return out


# -- Prometheus text exposition ---------------------------------------------------------------

_COUNTERS = {  # Redis counter -> (metric, help)
    "lookup_hit_chunks": ("pdserve_kvstore_lookup_hit_chunks_total", "Prompt chunks found in the store."),
    "lookup_miss_chunks": ("pdserve_kvstore_lookup_miss_chunks_total", "Prompt chunks not in the store."),
    "lookup_failures": ("pdserve_kvstore_lookup_failures_total", "Lookups that failed (Redis down)."),
    "saved_chunks": ("pdserve_kvstore_saved_chunks_total", "Chunks engines stored."),
    "load_failures": ("pdserve_kvstore_load_failures_total", "Chunks that had to be recomputed."),
    "checksum_failures": ("pdserve_kvstore_checksum_failures_total", "Chunks whose bytes failed xxh3."),
    "slot_mismatches": ("pdserve_kvstore_slot_mismatches_total", "Reads of a slot reused since lookup."),
    "get_failures": ("pdserve_kvstore_get_failures_total", "Chunks a transfer failed to deliver."),
    "replicated_chunks": ("pdserve_kvstore_replicated_chunks_total", "Hot chunks given a replica where they are read."),
    "replication_failures": ("pdserve_kvstore_replication_failures_total",
                             "Replica pulls given up (source gone, bytes not verified)."),
}
_NODE_GAUGES = {
    "capacity": ("pdserve_kvstore_segment_capacity_bytes", "Segment size."),
    "used_bytes": ("pdserve_kvstore_segment_used_bytes", "Bytes in allocated slots."),
    "chunks": ("pdserve_kvstore_segment_chunks", "Committed chunks held."),
    "pinned": ("pdserve_kvstore_segment_pinned_chunks", "Chunks pinned by a remote read in flight."),
}
_NODE_COUNTERS = {
    "evicted": ("pdserve_kvstore_evictions_total", "Chunks evicted for room (LRU)."),
    "expired": ("pdserve_kvstore_expired_total", "Chunks dropped after their idle TTL."),
    "rejected": ("pdserve_kvstore_rejected_writes_total", "Chunks refused: the segment was full of leased data."),
    "republished": ("pdserve_kvstore_republished_total", "Chunks re-published after Redis lost them."),
    "replicas": ("pdserve_kvstore_replicas_total", "Replicas of other nodes' hot chunks committed here."),
}


def labels(**kv: str) -> str:
    """Prometheus label set text: ``{a="x",b="y"}`` ("" for none)."""
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in kv.items())
    return "{" + inner + "}" if inner else ""


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def family(lines: list[str], name: str, kind: str, help_text: str, samples: Iterable[tuple[str, float]]) -> None:
    """Append one metric family (HELP, TYPE, a line per (labels, value) sample); nothing if
    there are no samples."""
    rows = list(samples)
    if not rows:
        return
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} {kind}")
    lines.extend(f"{name}{tags} {value:g}" for tags, value in rows)


def render_prometheus(stats: StoreStats | None) -> str:
    """The snapshot in Prometheus text format; ``None`` (Redis unreachable) gives up = 0."""
    lines: list[str] = []
    family(lines, "pdserve_kvstore_up", "gauge", "1 if the store's metadata (Redis) answered.",
            [("", 0 if stats is None else 1)])
    if stats is None:
        return "\n".join(lines) + "\n"
    t = stats.totals
    for key, (name, help_text) in _COUNTERS.items():
        family(lines, name, "counter", help_text, [("", t.get(key, 0))])
    family(lines, "pdserve_kvstore_loaded_chunks_total", "counter", "Chunks loaded into engines, by source.",
            [(labels(source=s), t.get(f"loaded_{s}_chunks", 0)) for s in ("local", "remote")])
    family(lines, "pdserve_kvstore_client_bytes_total", "counter", "Bytes engines moved, by transport and direction.",
            [(labels(transport=tr, direction=d), v) for tr in ("shm", "tcp", "grpc") for d in ("in", "out")
             if (v := t.get(f"bytes_{d}_{tr}", 0))])
    _histograms(lines, t)
    for key, (name, help_text) in _NODE_GAUGES.items():
        family(lines, name, "gauge", help_text,
                [(labels(node=n), s[key]) for n, s in stats.nodes.items() if key in s])
    for key, (name, help_text) in _NODE_COUNTERS.items():
        family(lines, name, "counter", help_text,
                [(labels(node=n), s[key]) for n, s in stats.nodes.items() if key in s])
    family(lines, "pdserve_kvstore_agent_bytes_total", "counter", "Bytes agents served or received, by transport.",
            [(labels(node=n, transport=tr, direction=d), s[f"bytes_{d}_{tr}"])
             for n, s in stats.nodes.items() for tr in ("tcp", "grpc") for d in ("in", "out")
             if f"bytes_{d}_{tr}" in s])
    family(lines, "pdserve_kvstore_agent_up", "gauge", "1 if the node's agent answered its Stats call.",
            [(labels(node=n), 0 if s.get("unreachable") else 1) for n, s in stats.nodes.items()])
    return "\n".join(lines) + "\n"


def histogram(lines: list[str], name: str, help_text: str,
              series: Iterable[tuple[dict[str, str], Iterable[tuple[str, int]], float, int]]) -> None:
    """Append one histogram family: per series (its labels, its cumulative (le, count) buckets
    ending with +Inf, the sum, the count) the bucket, sum and count lines; nothing if there
    are no series."""
    rows = list(series)
    if not rows:
        return
    lines.append(f"# HELP {name} {help_text}")
    lines.append(f"# TYPE {name} histogram")
    for tags, buckets, total, count in rows:
        lines.extend(f"{name}_bucket{labels(**tags, le=le)} {n}" for le, n in buckets)
        lines.append(f"{name}_sum{labels(**tags)} {total:g}")
        lines.append(f"{name}_count{labels(**tags)} {count}")


def _histograms(lines: list[str], totals: dict[str, int]) -> None:
    """``get_seconds:<transport>_bucket:<le>`` counters -> one Prometheus histogram."""
    transports = sorted({k.split(":")[1].split("_bucket")[0] for k in totals if k.startswith("get_seconds:")
                         and "_bucket:" in k})
    les = [*map(str, LATENCY_BUCKETS), "+Inf"]
    histogram(lines, "pdserve_kvstore_get_seconds", "Time to move one request's chunks from one node, by transport.",
              [({"transport": tr}, [(le, totals.get(f"get_seconds:{tr}_bucket:{le}", 0)) for le in les],
                totals.get(f"get_seconds:{tr}_sum_us", 0) / 1e6, totals.get(f"get_seconds:{tr}_count", 0))
               for tr in transports])
