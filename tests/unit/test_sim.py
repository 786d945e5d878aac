"""The cluster simulator (bench/sim): its arithmetic, its caches, its trace format, and that it
drives the real routing policies deterministically. No Ray, no Redis, no engine."""

from __future__ import annotations

import json
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest

from bench.sim.calibrate import CalibrationRequest, check_runs, prefill_speeds, simulated_ttft
from bench.sim.calibrate import table as calibration_table
from bench.sim.cluster import ClusterSpec, SimCluster
from bench.sim.decode import DecodeReplica, DecodeSeq
from bench.sim.events import EventLoop
from bench.sim.metrics import SLO, RequestRecord, summarize, window
from bench.sim.multiturn import MultiTurnSpec, conversations, schedule
from bench.sim.profiles import CPU_SMOLLM2, H100_LLAMA8B, CostModel
from bench.sim.runner import knee
from bench.sim.store import KVStore
from bench.sim.streams import RequestStream, StreamSpec
from bench.sim.workload import SimRequest, TraceFormatError, chunk_keys, load_trace, parse_line, to_requests

H100 = H100_LLAMA8B


def request(rid: str, t: float, n: int, out: int, ids: list[int], cost: CostModel = H100) -> SimRequest:
    return SimRequest(rid, t, n, out, chunk_keys(ids, n, cost.chunk_tokens, cost.chunk_tokens))


def run(requests: list[SimRequest], policy: str = "round_robin", replicas: int = 2, per_node: int = 8,
        cost: CostModel = H100, seed: int = 0) -> dict[str, RequestRecord]:
    records = SimCluster(ClusterSpec(replicas, per_node=per_node), cost, policy, seed).run(requests)
    return {r.rid: r for r in records}


def test_one_request_ttft_and_tpot_are_the_cost_models_arithmetic() -> None:
    n, out, c = 1000, 11, H100.chunk_tokens
    rec = run([request("a", 0.0, n, out, list(range(10)))])["a"]
    assert rec.ttft_s == pytest.approx(H100.prefill_step_s + n * H100.prefill_token_s)
    assert (rec.own_tokens, rec.node_tokens, rec.remote_tokens, rec.compute_tokens) == (0, 0, 0, n)
    # decode (same node: 2 replicas, one node): load the stored chunks, compute the tail, then
    # out - 1 steps at batch 1 with the whole prompt (+ the first token) in KV
    stored = n // c * c
    join = stored * H100.same_node_token_s + (n + 1 - stored) * H100.prefill_token_s
    step = H100.decode_step_time(1, n + 1)
    assert rec.decode_same_node
    assert rec.tpot_s == pytest.approx((join + (out - 1) * step) / (out - 1))


def test_a_long_prompt_takes_several_budgeted_steps() -> None:
    n = 2 * CPU_SMOLLM2.max_num_batched_tokens + 100
    rec = run([request("a", 0.0, n, 1, list(range(n // 32)), CPU_SMOLLM2)], cost=CPU_SMOLLM2)["a"]
    assert rec.ttft_s == pytest.approx(3 * CPU_SMOLLM2.prefill_step_s + n * CPU_SMOLLM2.prefill_token_s)
    assert rec.tpot_s is None and rec.decode_replica == ""


def test_repeated_prompt_hits_own_cache_and_another_nodes_prompt_loads_remotely() -> None:
    # 4 replicas, 2 per node: decode-0000 + prefill-0001 on node-000, decode-0002 + prefill-0003
    # on node-001; round robin sends the prefills to 0001, 0003, 0001
    n, c = 2100, H100.chunk_tokens
    ids = list(range(9))
    reqs = [request(f"r{i}", 10.0 * i, n, 4, ids) for i in range(3)]
    recs = run(reqs, replicas=4, per_node=2)
    assert [recs[f"r{i}"].prefill_replica for i in range(3)] == ["prefill-0001", "prefill-0003", "prefill-0001"]
    hit = (n - 1) // c * c  # whole chunks, never the last token
    assert recs["r1"].remote_tokens == hit and recs["r1"].own_tokens == 0
    assert recs["r1"].ttft_s == pytest.approx(H100.prefill_step_time(n - hit, hit * H100.remote_token_s))
    assert recs["r2"].own_tokens == hit and recs["r2"].remote_tokens == 0
    assert recs["r2"].compute_tokens == n - hit


def test_store_keeps_one_location_per_chunk_and_reports_changes() -> None:
    events: list[tuple[str, str, list[bytes]]] = []
    cost = replace(H100, store_chunks_per_node=2)
    store = KVStore(cost, ["a", "b"], lambda op, node, keys: events.append((op, node, keys)))
    k = [bytes([i]) * 16 for i in range(4)]
    assert store.save("a", k[:2]) == 2
    assert store.save("b", k[:3]) == 1  # k0, k1 are held on a: only k2 goes to b
    assert store.node_of(k[0]) == "a" and store.node_of(k[2]) == "b"
    hit = store.fetch("b", k, 0, 4)
    assert (hit.chunks, hit.same_node_chunks, hit.remote_chunks) == (3, 1, 2)
    store.save("a", [k[3]])  # a is full: its least recently used chunk goes
    assert events[-1][0] == "removed" and store.node_of(k[3]) == "a"
    assert store.stats["loaded_remote_chunks"] == 2


def test_decode_epochs_match_a_step_by_step_batch() -> None:
    """The replica's epochs (one wake per batch change) against the obvious simulation: every
    step, whoever is waiting joins, every member gets a token, finished ones leave."""
    cost = replace(H100, decode_max_seqs=2)
    loop = EventLoop()
    store = KVStore(cost, ["n"], lambda *_: None)
    replica = DecodeReplica("d", "n", cost, store, loop)
    arrivals = [(0.0, 300, 5), (0.004, 500, 3), (0.005, 200, 4), (0.031, 900, 2)]  # (t, prompt, output)
    done: dict[str, float] = {}
    for i, (t, n, out) in enumerate(arrivals):
        seq = DecodeSeq(SimRequest(f"s{i}", t, n, out, ()), t, lambda s: done.__setitem__(s.request.rid, s.done_s))
        loop.at(t, partial(replica.submit, seq))
    loop.run()
    # reference: nothing is stored, so a joiner computes its prompt + 1 in its join step
    now, queue = 0.0, list(range(len(arrivals)))
    batch: dict[int, tuple[int, int]] = {}  # sequence -> (tokens left, KV tokens)
    ref: dict[str, float] = {}
    while queue or batch:
        waiting = [i for i in queue if arrivals[i][0] <= now]
        if not batch and not waiting:
            now = min(arrivals[i][0] for i in queue)
            continue
        joining = waiting[: cost.decode_max_seqs - len(batch)]
        for i in joining:
            queue.remove(i)
            batch[i] = (arrivals[i][2] - 1, arrivals[i][1] + 1)
        kv = sum(kv for _, kv in batch.values())
        now += cost.decode_step_time(len(batch), kv) + sum((arrivals[i][1] + 1) * cost.prefill_token_s for i in joining)
        batch = {i: (left - 1, kv + 1) for i, (left, kv) in batch.items()}
        for i in [i for i, (left, _) in batch.items() if left == 0]:
            ref[f"s{i}"] = now
            del batch[i]
    assert done.keys() == ref.keys()
    for rid, t in ref.items():  # the epoch model takes the batch's KV at the epoch start
        assert done[rid] == pytest.approx(t, rel=2e-3)


def test_mooncake_trace_lines_load_and_share_prefix_keys(tmp_path: Path) -> None:
    lines = [
        {"timestamp": 0, "input_length": 1200, "output_length": 10, "hash_ids": [1, 2, 3]},
        {"timestamp": 500, "input_length": 1100, "output_length": 5, "hash_ids": [1, 2, 9]},
    ]
    path = tmp_path / "trace.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    trace = load_trace(path)
    assert [t.hash_ids for t in trace] == [(1, 2, 3), (1, 2, 9)]
    # 512 tokens per id in the file, replayed at 32 per id with 32-token chunks
    reqs = to_requests(trace, 32, 32, time_scale=2.0, trace_tokens_per_id=512)
    assert [r.prompt_tokens for r in reqs] == [75, 69] and reqs[1].arrival_s == pytest.approx(1.0)
    assert reqs[0].keys[:2] == reqs[1].keys[:2] and len(reqs[0].keys) == 2
    # at 512 per id with 256-token chunks each id is two chunks, chained
    big = to_requests(trace, 512, 256)
    assert big[0].keys[:4] == big[1].keys[:4] and len(big[0].keys) == 4
    with pytest.raises(TraceFormatError):
        parse_line('{"timestamp": 1, "input_length": 5}', "x:1")


def test_multiturn_turns_extend_the_previous_turns_blocks() -> None:
    spec = MultiTurnSpec(conversations=20, turns_mean=3.0, tokens_per_id=512)
    convs = conversations(spec, seed=3)
    for conv in convs:
        for prev, cur in zip(conv.turns, conv.turns[1:], strict=False):
            full = prev.input_length // 512
            assert cur.hash_ids[:full] == prev.hash_ids[:full]
            assert cur.input_length > prev.input_length
    trace = schedule(convs, 10.0, seed=3)  # the burn-in drops the turns before time 0
    assert 0 < len(trace) < sum(len(c.turns) for c in convs) and trace[0].timestamp_ms >= 0
    assert all(a.timestamp_ms <= b.timestamp_ms for a, b in zip(trace, trace[1:], strict=False))
    assert schedule(convs, 10.0, seed=3, limit=12) == trace[:12]
    assert conversations(spec, seed=3) == convs


def small_workload(rate: float, requests: int = 150) -> list[SimRequest]:
    stream = RequestStream(StreamSpec("multiturn", think_s=1.0, think_min_s=0.5), requests, H100.chunk_tokens, seed=1)
    return stream.at_rate(rate)


def test_kv_aware_gets_more_cache_hits_than_round_robin_on_shared_prefixes() -> None:
    reqs = small_workload(6.0)
    win = window([r.arrival_s for r in reqs], 0.0, 0.0)
    slo = SLO(H100.ttft_slo_s, H100.tpot_slo_s)
    hits = {}
    for policy in ("round_robin", "kv_aware"):
        recs = SimCluster(ClusterSpec(8, per_node=4), H100, policy, 0).run(reqs)
        hits[policy] = summarize(policy, 8, recs, slo, win, 0.0, 0).hit_own
    assert hits["kv_aware"] > hits["round_robin"] + 0.05


def test_same_seed_same_numbers_and_every_policy_runs() -> None:
    reqs = small_workload(6.0, 60)
    for policy in ("round_robin", "least_loaded", "prefix_tree_approx", "kv_aware"):
        a = SimCluster(ClusterSpec(8, per_node=4), H100, policy, 7).run(reqs)
        b = SimCluster(ClusterSpec(8, per_node=4), H100, policy, 7).run(reqs)
        assert a == b and len(a) == len(reqs)


def test_calibration_hook_returns_ttft_per_request_in_order() -> None:
    cost = CPU_SMOLLM2
    reqs = [CalibrationRequest((("sys", 256), ("u0", 100)), 8, 0.0),
            CalibrationRequest((("sys", 256), ("u0", 300)), 8, 5.0)]
    first, second = simulated_ttft(reqs, policy="round_robin")  # the second goes to the other replica
    assert first == pytest.approx(cost.prefill_step_s + 356 * cost.prefill_token_s)
    shared = 356 // 32 * 32  # the first request's whole chunks, in the store on their one node
    assert second == pytest.approx(cost.prefill_step_time(556 - shared, shared * cost.same_node_token_s))


def test_overhead_and_speed_enter_the_simulated_ttft() -> None:
    cost = replace(CPU_SMOLLM2, request_overhead_s=0.3)
    reqs = [CalibrationRequest((("sys", 256), ("u0", 100)), 8, 0.0),
            CalibrationRequest((("sys", 512), ("u1", 100)), 8, 0.0)]  # both at once: one per replica
    fast, slow = sorted(simulated_ttft(reqs, "round_robin", cost, prefill_speeds=(1.0, 0.5)))
    assert fast == pytest.approx(0.3 + cost.prefill_step_time(356))
    assert slow == pytest.approx(0.3 + cost.prefill_step_time(612, speed=0.5))


def test_a_prefill_replica_sharing_a_core_with_busy_decode_runs_at_half_speed() -> None:
    cost = CPU_SMOLLM2
    reqs = [CalibrationRequest((("a", 256),), 200, 0.0),  # replica 0, then decodes for ~20 s
            CalibrationRequest((("b", 256),), 8, 3.0)]  # replica 1, while decode is busy
    for shared, speed in (((), 1.0), (((1, 0),), 0.5)):
        _, second = simulated_ttft(reqs, "round_robin", cost, shared_cores=shared)
        assert second == pytest.approx(cost.prefill_step_time(256, speed=speed))


def _made_by_the_model(overhead: float, speeds: tuple[float, float]) -> dict:
    """One round of a bench.policies report whose 'measurements' the simulator made itself."""
    cost = replace(CPU_SMOLLM2, request_overhead_s=overhead, prefill_step_s=0.0, same_node_token_s=0.0,
                   remote_token_s=0.0)  # the checked profile: steps priced by computed tokens alone
    tps = cost.prefill_tps()
    turns = [(conv, turn) for turn in range(3) for conv in range(4)]
    reqs = [CalibrationRequest(((f"sys{conv % 2}", 320), (f"conv{conv}", 48 * (turn + 1))), 8, 2.0 * turn + 0.1 * conv)
            for conv, turn in turns]
    runs = {}
    for policy in ("kv_aware", "round_robin"):
        ttft = simulated_ttft(reqs, policy, cost, prefill_speeds=speeds)
        records = [{"conv": conv, "sent_s": r.arrival_s, "prompt_tokens": r.prompt_tokens, "output_tokens": 8,
                    "ttft_s": t, "prefill_engine_s": t - overhead}
                   for (conv, _), r, t in zip(turns, reqs, ttft, strict=True)]
        view = {"replicas": {"p-a": {"prefill_tps": tps * speeds[1]}, "p-b": {"prefill_tps": tps * speeds[0]},
                             "d": {"node": "n"}}}
        runs[policy] = {"records": records, "router_view": view}
    return runs


ARGS = {"system_len": "320", "system_prompts": "2"}


def test_check_runs_recovers_a_run_made_by_the_model_it_checks() -> None:
    """With a known overhead and known replica speeds, the check must read both back and
    match the run exactly."""
    checks = check_runs({"args": ARGS, "policies": _made_by_the_model(0.25, (1.0, 0.6))})
    for c in checks.values():
        assert c["overhead_s"] == pytest.approx(0.25) and c["prefill_speeds"] == [1.0, 0.6]
        assert c["p50_ratio"] == pytest.approx(1.0) and c["p90_ratio"] == pytest.approx(1.0)
        assert "rounds" not in c
    assert "| kv_aware |" in calibration_table(checks)


def test_check_runs_replays_each_round_with_its_own_measurements_and_pools_them() -> None:
    """Rounds on a machine in different phases (other speeds, another overhead): each is
    replayed with what was measured in it, so the pooled check still matches exactly, and
    each round's own ratios are kept."""
    rounds = [_made_by_the_model(0.25, (1.0, 0.6)), _made_by_the_model(0.1, (0.5, 0.4))]
    checks = check_runs({"args": ARGS, "policies": {}, "rounds": rounds})
    for name, c in checks.items():
        assert c["requests"] == 24 and c["prefill_speeds"] == [[1.0, 0.6], [0.5, 0.4]]
        assert c["overhead_s"] == [pytest.approx(0.25), pytest.approx(0.1)]
        assert c["p50_ratio"] == pytest.approx(1.0) and c["p90_ratio"] == pytest.approx(1.0)
        assert [r["p90_ratio"] for r in c["rounds"]] == [pytest.approx(1.0)] * 2
        pooled = sorted(r["ttft_s"] for rd in rounds for r in rd[name]["records"])
        assert c["measured_p90_s"] == pytest.approx(pooled[int(0.9 * len(pooled))], abs=1e-4)
    assert "1.00 · 1.00, 1.00 · 1.00" in calibration_table(checks)


def test_prefill_speeds_leave_out_the_warm_up_where_the_counters_before_the_workload_are_known() -> None:
    """A slow first forward (the warm-up) is in the replica's life mean, not in the workload:
    the counters after the warm-up and at the end give the workload's own rate."""
    tps = CPU_SMOLLM2.prefill_tps()
    warm = {"replicas": {"p-a": {"prefill_tps": 10.0, "prefill_counted": [368, 5.0]}}}
    end = {"replicas": {"p-a": {"prefill_tps": 1.0, "prefill_tps_mean": (368 + tps * 10) / 15.0,
                                "prefill_counted": [368 + int(tps * 10), 15.0]}, "d": {"node": "n"}}}
    assert prefill_speeds(end, CPU_SMOLLM2, warm) == (pytest.approx(1.0, abs=1e-3),)
    assert prefill_speeds(end, CPU_SMOLLM2)[0] < 0.8  # the life mean, warm-up and all
    assert prefill_speeds(end, CPU_SMOLLM2, {"replicas": {}}) == prefill_speeds(end, CPU_SMOLLM2)


def test_knee_interpolates_where_attainment_crosses_the_target() -> None:
    base = summarize("p", 8, [], SLO(1, 1), (0.0, 1.0), 0.0, 0)
    pts = [replace(base, offered_rps=r, slo_attainment=a) for r, a in ((10, 1.0), (20, 0.95), (30, 0.85))]
    k = knee(pts, 0.9)
    assert k.note == "interpolated" and k.rps == pytest.approx(25.0)
    assert knee(pts[:2], 0.9).note == "above the highest rate tested"
