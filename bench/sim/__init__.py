"""``bench.sim``: a discrete-event simulator of a pdserve cluster that drives the real routing
policies (``router.policy``) with simulated prefill/decode engines and a simulated store.

    profiles   cost models (cpu-smollm2 measured here, h100-llama8b from published figures)
    workload   Mooncake-format traces, chunk keys; multiturn: the conversation generator
    prefill / decode / store / lru / meter    the simulated engines and store
    cluster    wiring: the same calls router/app.py and router/replica_router.py make
    runner / capacity / metrics / report      the sweep and its results
    calibrate  simulated TTFTs of a small CPU workload, to compare with a real run

Run it with ``python -m bench.sim``; docs/sim.md says what is and is not simulated.
"""
