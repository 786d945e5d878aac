"""The router's own Prometheus metrics, served at ``/metrics`` after the store's: each
pool's replicas as the dashboard shows them (router/live.py), and the requests this router
replica served. Prometheus scrapes every router replica; ``deploy/grafana/pdserve.json``
is a dashboard over these names and the store's.
"""

from __future__ import annotations

from typing import Any

from kvstore.stats import family, histogram, labels
from router.live import Histogram, RequestLog

# Per replica: gauges of its state, and its cumulative counters (Prometheus takes the rates:
# utilization = rate(busy seconds), tokens/s, prefix hit ratio = rate(cached) / rate(prompt)).
_REPLICA_GAUGES = {
    "running": ("pdserve_replica_running", "Requests the replica's engine is running."),
    "waiting": ("pdserve_replica_waiting", "Requests waiting in the replica's engine."),
    "kv_usage": ("pdserve_replica_kv_usage_ratio", "Fraction of the engine's KV cache in use."),
    "queued_tokens": ("pdserve_replica_queued_prompt_tokens", "Prompt tokens of requests before their first token."),
}
_REPLICA_COUNTERS = {
    "busy_s": ("pdserve_replica_busy_seconds_total", "Seconds with at least one request in flight."),
    "computed_tokens": ("pdserve_replica_computed_tokens_total", "Prompt tokens the engine computed."),
    "prompt_tokens": ("pdserve_replica_prompt_tokens_total", "Prompt tokens of the requests it prefilled."),
    "cached_tokens": ("pdserve_replica_cached_tokens_total", "Of them, tokens taken from its cache or the store."),
    "generated_tokens": ("pdserve_replica_generated_tokens_total", "Output tokens the engine generated."),
}
_REQUEST_COUNTERS = {
    "requests": ("pdserve_requests_total", "Requests this router served to the end."),
    "prompt_tokens": ("pdserve_prompt_tokens_total", "Prompt tokens of those requests."),
    "cached_tokens": ("pdserve_cached_prompt_tokens_total", "Of them, tokens the prefill engine did not compute."),
    "output_tokens": ("pdserve_output_tokens_total", "Output tokens sent."),
}

_FAULT_COUNTERS = {
    "rejected": ("pdserve_requests_rejected_total", "Requests answered 429 (admission, a pool's queue)."),
    "prefill_retries": ("pdserve_prefill_retries_total", "Prefills retried on another replica after one was lost."),
    "decode_resumes": ("pdserve_decode_resumes_total", "Decode streams resumed on another replica after one was lost."),
    "failed": ("pdserve_requests_failed_total", "Requests that ended in an error after admission (503)."),
    "timed_out": ("pdserve_requests_timed_out_total", "Requests stopped at router.request_timeout_s."),
}

_CHANNEL_COUNTERS = {
    "messages": ("pdserve_token_channel_messages_total", "Messages (one per decode step and replica) into this "
                 "router's token inbox."),
    "deltas": ("pdserve_token_channel_deltas_total", "Token deltas those messages carried to open streams."),
    "dropped": ("pdserve_token_channel_dropped_total", "Deltas for streams no longer open (cancelled, resumed)."),
    "rejected": ("pdserve_token_channel_rejected_total", "Messages without the inbox's secret, or unreadable."),
}


def render_pools(snap: dict[str, Any]) -> str:
    """Each pool's replicas as a ``router.live.snapshot`` holds them (the same in every
    router replica: each sees every engine's reports)."""
    lines: list[str] = []
    rows = [(role, row) for role, pool in snap["pools"].items() for row in pool]
    family(lines, "pdserve_replicas", "gauge", "Replicas per pool, as the router sees them.",
           [(labels(role=role), len(pool)) for role, pool in snap["pools"].items()])
    for key, (name, help_text) in _REPLICA_GAUGES.items():
        family(lines, name, "gauge", help_text,
               [(labels(role=role, replica=r["replica"], node=r["node"]), r[key]) for role, r in rows])
    for key, (name, help_text) in _REPLICA_COUNTERS.items():
        family(lines, name, "counter", help_text,
               [(labels(role=role, replica=r["replica"], node=r["node"]), r["totals"][key]) for role, r in rows])
    return "\n".join(lines) + "\n" if lines else ""


def render_requests(log: RequestLog, channel: dict[str, int] | None = None) -> str:
    """The requests this router replica served and its token inbox's counters
    (``kvstore.token_channel``): its own, summed over replicas by Prometheus."""
    lines: list[str] = []
    for key, (name, help_text) in _CHANNEL_COUNTERS.items():
        family(lines, name, "counter", help_text, [("", (channel or {}).get(key, 0))])
    for key, (name, help_text) in _REQUEST_COUNTERS.items():
        family(lines, name, "counter", help_text, [("", log.totals[key])])
    for key, (name, help_text) in _FAULT_COUNTERS.items():
        family(lines, name, "counter", help_text, [("", log.faults[key])])
    _histogram(lines, "pdserve_request_ttft_seconds", "Time to first token, from the request to its first token.",
               log.ttft)
    _histogram(lines, "pdserve_request_tpot_seconds", "Time per output token after the first.", log.tpot)
    return "\n".join(lines) + "\n"


def _histogram(lines: list[str], name: str, help_text: str, h: Histogram) -> None:
    histogram(lines, name, help_text, [({}, h.cumulative(), h.sum, h.count)])
