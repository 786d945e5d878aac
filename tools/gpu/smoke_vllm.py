"""Smoke tests for CUDA vLLM (+ Ray Serve) on the lent GPU machine.

    python3 smoke_vllm.py offline MODEL_DIR [--gpu-mem 0.35] [--eager] [--tag A]
    python3 smoke_vllm.py kv MODEL_DIR [--eager]         # ExampleConnector P->D
    python3 smoke_vllm.py serve MODEL_DIR [--eager]      # Ray Serve, 2 vLLM replicas on 1 GPU
MODEL_DIR: a folder from make_tiny_llama.py (weights are random: load_format=dummy).
Prints one 'RESULT ...' line per test.
"""
import argparse
import os
import time

ap = argparse.ArgumentParser()
ap.add_argument("mode", choices=["offline", "kv", "serve"])
ap.add_argument("model")
ap.add_argument("--gpu-mem", type=float, default=0.35)
ap.add_argument("--eager", action="store_true")
ap.add_argument("--tag", default="A")
ap.add_argument("--max-tokens", type=int, default=32)
a = ap.parse_args()

PROMPTS = ["hello world, the quick brown fox", "once upon a time there was a small llama",
           "prefill decode cluster serve request", "token cache model engine replica batch"]


def engine_kwargs(**extra):
    kw = dict(model=a.model, load_format="dummy", dtype="bfloat16", max_model_len=2048,
              gpu_memory_utilization=a.gpu_mem, enforce_eager=a.eager, seed=0)
    kw.update(extra)
    return kw


def offline():
    t0 = time.time()
    from vllm import LLM, SamplingParams
    t_imp = time.time() - t0
    llm = LLM(**engine_kwargs())
    t_init = time.time() - t0 - t_imp
    sp = SamplingParams(max_tokens=a.max_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(PROMPTS[:1], sp)  # warm-up
    t1 = time.time()
    outs = llm.generate(PROMPTS * 8, sp)
    dt = time.time() - t1
    ntok = sum(len(o.outputs[0].token_ids) for o in outs)
    print("sample:", repr(outs[0].outputs[0].text[:60]), outs[0].outputs[0].token_ids[:8])
    print(f"RESULT offline tag={a.tag} import_s={t_imp:.1f} init_s={t_init:.1f} "
          f"gen_s={dt:.2f} tokens={ntok} tok_per_s={ntok/dt:.0f} eager={a.eager} gpu_mem={a.gpu_mem}",
          flush=True)


def kv():
    # One engine as producer (prefill, saves KV to disk), then a fresh engine as
    # consumer (loads KV for the same prompt instead of recomputing it).
    import gc

    import torch
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1
    from vllm.distributed.kv_transfer.kv_connector.v1.example_connector import ExampleConnector
    assert issubclass(ExampleConnector, KVConnectorBase_V1)
    path = "/tmp/pd_kv_store"
    os.makedirs(path, exist_ok=True)
    prompt = [" ".join(PROMPTS * 8)]  # > 1 block of tokens
    res = {}
    for role in ("kv_producer", "kv_consumer"):
        cfg = KVTransferConfig(kv_connector="ExampleConnector", kv_role=role,
                               kv_connector_extra_config={"shared_storage_path": path})
        t0 = time.time()
        llm = LLM(**engine_kwargs(kv_transfer_config=cfg, enable_prefix_caching=False))
        sp = SamplingParams(max_tokens=1 if role == "kv_producer" else 8, temperature=0.0)
        out = llm.generate(prompt, sp)
        res[role] = (out[0].outputs[0].token_ids, time.time() - t0)
        del llm
        gc.collect()
        torch.cuda.empty_cache()
        if role == "kv_producer":
            # the engine core runs in a child process; give it time to exit
            time.sleep(3)
    nfiles = sum(len(f) for _, _, f in os.walk(path))
    print(f"RESULT kv files_in_store={nfiles} producer_first_tok={list(res['kv_producer'][0])} "
          f"consumer_toks={list(res['kv_consumer'][0])} "
          f"same_first_token={res['kv_producer'][0][0] == res['kv_consumer'][0][0]}", flush=True)


def serve():
    import ray
    from ray import serve
    t0 = time.time()
    ray.init(num_gpus=1, include_dashboard=False, log_to_driver=True)
    serve.start(http_options={"host": "127.0.0.1", "port": 8011})

    @serve.deployment(ray_actor_options={"num_gpus": 0.4})
    class Engine:
        def __init__(self, role):
            from vllm import LLM
            self.role = role
            self.llm = LLM(**engine_kwargs())

        def generate(self, prompt, n):
            from vllm import SamplingParams
            o = self.llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
            return {"role": self.role, "tokens": list(o[0].outputs[0].token_ids),
                    "cuda_visible": os.environ.get("CUDA_VISIBLE_DEVICES")}

    @serve.deployment
    class Ingress:
        def __init__(self, prefill, decode):
            self.p, self.d = prefill, decode

        async def __call__(self, request):
            body = await request.json()
            p = await self.p.generate.remote(body["prompt"], 1)
            d = await self.d.generate.remote(body["prompt"], body.get("n", 16))
            return {"prefill": p, "decode": d}

    app = Ingress.bind(Engine.options(name="Prefill").bind("prefill"),
                       Engine.options(name="Decode").bind("decode"))
    serve.run(app, name="pd", route_prefix="/")
    t_up = time.time() - t0
    import httpx
    t1 = time.time()
    r = httpx.post("http://127.0.0.1:8011/", json={"prompt": PROMPTS[0], "n": 16}, timeout=120)
    t_req = time.time() - t1
    print("serve reply:", r.status_code, r.text[:300])
    import torch
    print(f"RESULT serve up_s={t_up:.1f} request_s={t_req:.2f} status={r.status_code} "
          f"gpus_seen_by_driver={torch.cuda.device_count()}", flush=True)
    serve.shutdown()
    ray.shutdown()


{"offline": offline, "kv": kv, "serve": serve}[a.mode]()
