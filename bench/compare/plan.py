"""What a comparison runs: which systems, which workloads on each, how large, and under which
SLO. Pure data, so the unit tests can pin it and the report can print it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from bench.load.report import SCENARIOS, Slo
from bench.load.workloads import Session, Shape, multiturn_workload, random_workload, shared_prefix_workload

WORKLOADS = ("random", "shared_prefix", "multiturn")
PEERS = ("monolithic", "rayllm", "rayllm_pd")
POLICIES = ("kv_aware", "prefix_tree_approx", "round_robin", "least_loaded")
POLICY_SYSTEM = "pdserve-"  # + policy: 2 prefill + 1 decode replicas routed by that policy
SYSTEMS = ("pdserve", *PEERS, *(POLICY_SYSTEM + p for p in POLICIES))
# The default run: every peer, and the policies issue 5 sets kv_aware against (least_loaded
# on request: each policy is a cluster start, and the whole run must stay under 30 minutes).
DEFAULT_SYSTEMS = tuple(s for s in SYSTEMS if s != POLICY_SYSTEM + "least_loaded")

# With one prefill replica every policy makes the same choice, so the policies run on 2
# prefill + 1 decode replicas (bench.policies' layout: prefill 0 on core 0, prefill 1 sharing
# core 1 with decode), and only where they differ: prompts that share prefixes.
POLICY_WORKLOADS = ("shared_prefix", "multiturn")

# The seed scenario for interactive chat (TTFT 1 s, 30 ms per output token), stretched 10x:
# a 135M model on two CPU cores decodes in tens of milliseconds per token, not a few.
CPU_SLO_SCALE = 10.0


@dataclass(frozen=True)
class Plan:
    shapes: dict[str, Shape]  # workload -> its lengths
    concurrency: int  # sessions in flight (closed loop)
    warmup: int  # unmeasured requests before the first workload, on every system
    timeout_s: float  # per request: a hung system costs this, not the whole run

    def workloads_for(self, system: str) -> tuple[str, ...]:
        return POLICY_WORKLOADS if system.startswith(POLICY_SYSTEM) else WORKLOADS

    def sessions(self, workload: str, vocab: Sequence[int], seed: int) -> list[Session]:
        """The same sessions for every system. Each workload draws from its own seed, so a
        later workload's system prompts are not already cached by an earlier one's."""
        make = {"random": random_workload, "shared_prefix": shared_prefix_workload,
                "multiturn": multiturn_workload}[workload]
        return make(vocab, self.shapes[workload], seed + 1 + WORKLOADS.index(workload))

    def describe(self, workload: str) -> str:
        s = self.shapes[workload]
        if workload == "random":
            return f"{s.requests} prompts of ~{s.input_len} tokens -> {s.output_len} tokens"
        turns = f"{s.turns} turns, each resending the history" if workload == "multiturn" else "one turn"
        prompts = "one system prompt" if s.system_prompts == 1 else f"{s.system_prompts} system prompts"
        return (f"{s.requests} sessions over {prompts} of {s.system_len} tokens, "
                f"~{s.input_len}-token questions, {turns}, {s.output_len} tokens per answer")


# The full run: under 30 minutes for the default systems here (each system starts once and
# runs its workloads back to back; a third to a half of a system's time is its engines starting).
FULL = Plan(
    shapes={
        "random": Shape(requests=12, input_len=256, output_len=64),
        "shared_prefix": Shape(requests=12, input_len=64, output_len=32, system_prompts=2, system_len=512),
        "multiturn": Shape(requests=5, input_len=48, output_len=32, system_prompts=2, system_len=384, turns=4),
    },
    concurrency=4, warmup=2, timeout_s=180.0,
)

# CI-sized: every workload and figure, a few requests each.
QUICK = Plan(
    shapes={
        "random": Shape(requests=4, input_len=64, output_len=8),
        "shared_prefix": Shape(requests=4, input_len=16, output_len=8, system_prompts=1, system_len=96),
        "multiturn": Shape(requests=2, input_len=16, output_len=8, system_prompts=1, system_len=96, turns=2),
    },
    concurrency=2, warmup=1, timeout_s=120.0,
)


def chat_slo(scale: float = CPU_SLO_SCALE) -> Slo:
    return SCENARIOS["chat"].scaled(scale)
