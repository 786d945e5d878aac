"""`pdserve` command line: prepare-model, up, down, status.

`up` starts (or joins) Ray, starts Redis if the config asks for it, one Store Agent per
node, and the Serve app; it returns once the HTTP API answers and prints the base URL.
`down` stops exactly what `up` started (recorded in $PDSERVE_HOME/run/state.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import urllib.request
from pathlib import Path

from cluster.auth import api_key_digests
from cluster.config import ClusterConfig
from cluster.env import pdserve_home, pin_ray_auth_mode
from cluster.log import get_logger
from cluster.model import ModelNotFound, prepare_default_model, resolve_model
from cluster.runtime import (
    RunState,
    StartError,
    free_port,
    ray_metrics_targets,
    redacted,
    start_ray_head,
    start_redis,
    stop_pid,
    stop_ray,
    wait_until,
)
from cluster.status import render as render_status
from kvstore import janitor
from kvstore.agent import reap_orphan_segments

log = get_logger(__name__)


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=5) as r:
        return bool(r.status == 200)


def cmd_prepare_model(args: argparse.Namespace) -> int:
    path = resolve_model(args.model) if args.model else prepare_default_model()
    print(path)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from cluster.app import build_app, controller_options

    cfg = ClusterConfig.load(args.config, args.set)
    key_digests = api_key_digests(cfg.router)  # refuse an open router before anything starts
    if RunState.load() is not None:
        print("a pdserve cluster is already up (pdserve status / pdserve down)", file=sys.stderr)
        return 1
    model_dir = resolve_model(cfg.model)
    _step(1, f"model {model_dir}")
    state = RunState(app_name=cfg.app_name)
    state.save()  # from here on, `pdserve down` can clean up whatever got started
    try:
        if cfg.ray_address:
            state.ray_address = cfg.ray_address
        else:
            state.ray_address, state.ray_temp_dir = start_ray_head()
        state.save()
        _step(2, f"Ray at {state.ray_address}")
        ray.init(address=state.ray_address, namespace="pdserve", log_to_driver=False)
        if cfg.kvstore.redis_url:
            state.redis_url = cfg.kvstore.redis_url
        elif cfg.ray_address:  # a cluster we joined can end without us (`ray down`): Redis ends with it
            from cluster.redis_host import start_redis_host

            state.redis_url, state.redis_port, state.redis_pid = start_redis_host(pdserve_home() / "run")
        else:
            state.redis_url, state.redis_port, state.redis_pid = start_redis(pdserve_home() / "run")
        state.save()
        _step(3, f"Redis (the store's metadata) at {redacted(state.redis_url)}")
        from cluster.store_nodes import StoreNodesSpec, start_store

        kv = cfg.kvstore
        state.agents = start_store(StoreNodesSpec(
            state.redis_url, kv.capacity_mb << 20, kv.prefix, {"ttl_s": kv.ttl_s, "lease_s": kv.lease_s},
            tls=kv.tls_files(),
        ))
        state.save()
        _step(4, f"store agents on {len(state.agents)} node(s), {kv.capacity_mb} MiB of shared memory each")
        port = cfg.router.port or free_port()
        serve.start(http_options={"host": cfg.router.host, "port": port}, proxy_location=cfg.router.proxy_location,
                    controller_options=controller_options(cfg.router.serve_transport))
        _step(5, f"engines: {cfg.prefill.replicas} prefill + {cfg.decode.replicas} decode replicas "
                 "(about a minute on CPU)")
        _deploy_with_progress(build_app(cfg, model_dir, state.redis_url, key_digests), cfg.app_name)
        host = "127.0.0.1" if cfg.router.host in ("0.0.0.0", "::") else cfg.router.host
        state.url = f"http://{host}:{port}/v1"
        state.metrics_targets = ray_metrics_targets()
        state.save()
        wait_until(lambda: _http_ok(f"http://{host}:{port}/health"), 120, "the router")
    except BaseException as e:
        log.error("pdserve up failed (%s: %s); stopping what it started", type(e).__name__, e)
        _down(state)
        raise
    print(f"pdserve is up: OpenAI base URL {state.url}", flush=True)
    print(f"metrics: {state.url.removesuffix('/v1')}/metrics, and through Ray's export at "
          + ", ".join(f"http://{t}/metrics" for t in state.metrics_targets), flush=True)
    return 0


UP_STEPS = 5


def _step(n: int, text: str) -> None:
    print(f"[{n}/{UP_STEPS}] {text}", flush=True)


def _deploy_with_progress(app: object, name: str) -> None:
    """``serve.run`` (it returns when every replica is up), printing each pool's replicas as
    they come up instead of a minute of silence."""
    from ray import serve

    failure: list[BaseException] = []

    def run() -> None:
        try:
            serve.run(app, name=name, route_prefix="/")  # type: ignore[arg-type]
        except BaseException as e:  # re-raised in the caller's thread
            failure.append(e)

    worker = threading.Thread(target=run, name="pdserve-up-deploy", daemon=True)
    worker.start()
    last = ""
    while worker.is_alive():
        worker.join(2.0)
        status = serve.status().applications.get(name)
        if status is None:
            continue
        line = ", ".join(f"{dep}: " + " ".join(f"{n} {_plain(k).lower()}" for k, n in d.replica_states.items())
                         for dep, d in sorted(status.deployments.items()))
        if line and line != last:
            print(f"      {line}", flush=True)
            last = line
    if failure:
        raise failure[0]


def _down(state: RunState) -> None:
    import ray
    from ray import serve

    if state.ray_address:
        try:
            if not ray.is_initialized():
                ray.init(address=state.ray_address, namespace="pdserve", log_to_driver=False)
            # Delete the app first: that is Serve's graceful path, which runs each replica's
            # __del__ and so shuts its vLLM engine down cleanly (serve.shutdown alone gives
            # up after 10 s and the engines' shared memory is left behind).
            if state.app_name in serve.status().applications:
                serve.delete(state.app_name)
            serve.shutdown()
            from cluster.redis_host import stop_redis_host
            from cluster.store_nodes import stop_store

            stop_store()
            stop_redis_host()
        except Exception as e:
            log.warning("could not stop Serve / agents cleanly: %s", e)
        ray.shutdown()
    stop_ray(state.ray_temp_dir)
    stop_pid(state.redis_pid)
    janitor.sweep(min_age_s=0)  # every engine is down: what no process maps now is an orphan
    reap_orphan_segments()  # segments of store agents that died with their node (a dropped node)
    RunState.clear()


def cmd_down(args: argparse.Namespace) -> int:
    state = RunState.load()
    if state is None:
        print("no pdserve cluster is up")
        return 0
    _down(state)
    print("pdserve is down")
    return 0


def _plain(value: object) -> str:
    """Serve reports some states as enums and some as plain strings: print both as text."""
    return str(getattr(value, "value", value))


def cmd_status(args: argparse.Namespace) -> int:
    """The dashboard's picture as tables (``--json``: Serve's pool states, the router's
    snapshot and the store's raw stats)."""
    state = RunState.load()
    if state is None:
        print("no pdserve cluster is up")
        return 1
    import ray
    from ray import serve

    ray.init(address=state.ray_address, namespace="pdserve", log_to_driver=False)
    try:
        app = serve.status().applications.get(state.app_name)
    finally:
        ray.shutdown()
    pools: dict[str, dict[str, object]] = {}
    if app:
        for name, dep in app.deployments.items():
            pools[name] = {"status": _plain(dep.status),
                           "replicas": {_plain(k): n for k, n in dep.replica_states.items()}}
    root = state.url.removesuffix("/v1")
    try:
        with urllib.request.urlopen(root + "/dashboard/data", timeout=10) as r:
            live = json.loads(r.read())
    except OSError as e:
        print(f"pdserve at {state.url}: app {_plain(app.status) if app else 'missing'}; the router did not answer: {e}")
        return 1
    if args.json:
        app_status = _plain(app.status) if app else "missing"
        print(json.dumps({"url": state.url, "redis": redacted(state.redis_url), "app": app_status,
                          "deployments": pools, "live": live}, indent=2, default=str))
        return 0
    print(f"pdserve at {state.url}  ·  app {_plain(app.status) if app else 'missing'}  ·  dashboard {root}/dashboard")
    print(render_status(live, pools))  # deployments are named by role: prefill, decode, router
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # the load generator parses its own flags (pdserve bench --help)
        from bench.load.__main__ import main as bench_main

        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="pdserve", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare-model", help="convert the default model once (or check --model)")
    p.add_argument("--model", help="a local checkpoint directory to check instead")
    p.set_defaults(fn=cmd_prepare_model)
    p = sub.add_parser("up", help="start the cluster and print the OpenAI base URL")
    p.add_argument("--config", type=Path, help="YAML ClusterConfig")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set prefill.replicas=2 (repeatable)")
    p.add_argument("--model", help="shorthand for --set model=DIR")
    p.set_defaults(fn=cmd_up)
    sub.add_parser("down", help="stop what `up` started").set_defaults(fn=cmd_down)
    p = sub.add_parser("status", help="pools, replicas, store and recent latencies, as tables")
    p.add_argument("--json", action="store_true", help="the raw snapshot instead of tables")
    p.set_defaults(fn=cmd_status)
    sub.add_parser("bench", help="load an OpenAI endpoint (this cluster by default): TTFT, TPOT, goodput; "
                   "pdserve bench --help")
    args = parser.parse_args(argv)
    pin_ray_auth_mode()
    if getattr(args, "model", None) and args.cmd == "up":
        args.set.append(f"model={args.model}")
    try:
        return int(args.fn(args))
    except (StartError, ModelNotFound, ValueError) as e:
        print(f"pdserve {args.cmd}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
