"""pdserve side by side with the systems a user would pick instead, on the same cores, with
the same model and the same requests, one system at a time, in one run.

    .venv/bin/python -m bench.compare            # the whole comparison (under 30 minutes here)
    .venv/bin/python -m bench.compare --quick    # the same, tiny (CI checks its output)

Systems (``plan.SYSTEMS``): pdserve (1 prefill engine on core 0 + 1 decode engine on core
1); one monolithic vLLM server on both cores; Ray Serve LLM colocated (``build_openai_app``,
one engine on both cores); Ray Serve LLM's own prefill/decode app (``build_pd_openai_app``,
core 0 + core 1); and pdserve with each routing policy on 2 prefill + 1 decode replicas,
where the policy has a choice to make. Workloads (``bench.load.workloads``): random lengths,
a shared system prompt, multi-turn chat. Writes ``<name>.json`` (every figure and request),
``<name>.md`` (the tables, with pdserve / peer ratios) and PNG plots under ``--out-dir``.
"""
