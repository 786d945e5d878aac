"""The real `ray up` of deploy/ray/local.yaml: Ray's `local` provider reaches this machine over
SSH (an sshd of the test's own on loopback), the YAML's setup commands run deploy/ensure.sh
on the synced checkout, the head starts Ray and `pdserve up`, OpenAI requests are answered,
and `ray down` leaves no Ray, Redis or engine process behind.

The "remote" machine is this one, seen through sshd: its user's home (so every `~` in the
YAML), Ray's temp dir and pdserve's home lie in one directory of the test's, and every
process the cluster starts names it (command line, open logs or working directory). That is
how the leak check tells this test's processes from anything else on the host.

`ray up` and `ray down` run `ray stop` on the head, which stops EVERY Ray on the host: the
test refuses to start while another Ray runs here.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from cluster.model import DEFAULT_MODEL_NAME
from cluster.runtime import RunState, free_port, pids_mentioning
from kvstore import janitor
from kvstore.janitor import ENGINE_LOCKS, SHM_DIR, mapped_shm_inodes
from tests.e2e.sshd import SshHost, loopback_sshd

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).parent
VENV = Path(sys.executable).parent.parent
RAY = str(VENV / "bin" / "ray")


# -- the YAML: what a user fills in, nothing else -------------------------------------------


def _substitute(commands: list[str], old: str, new: str) -> list[str]:
    """Replace ``old``, which must occur exactly once in ``commands``: a change to the shipped
    YAML that this test no longer matches fails here, not somewhere inside `ray up`."""
    hits = sum(c.count(old) for c in commands)
    assert hits == 1, f"expected {old!r} once in {commands}"
    return [c.replace(old, new) for c in commands]


def head_pdserve_config(gcs_port: int, router_port: int) -> dict:
    """deploy/ray/pdserve-cpu.yaml made to fit this 2-core machine: one prefill and one decode
    replica, one core each, engines and store as in tests/e2e/cluster.yaml."""
    cfg = yaml.safe_load((REPO / "deploy/ray/pdserve-cpu.yaml").read_text())
    small = yaml.safe_load((HERE / "cluster.yaml").read_text())
    cfg["ray_address"] = f"127.0.0.1:{gcs_port}"
    # On loopback here, but with the shipped API keys file (made by the YAML's setup commands).
    cfg["router"].update(host="127.0.0.1", port=router_port)
    for pool, core in (("prefill", "0"), ("decode", "1")):
        cfg[pool].update(replicas=1, cpus_per_replica=1, cpu_binding=[core], engine=small[pool]["engine"])
    cfg["kvstore"] = small["kvstore"]
    return cfg


def cluster_yaml(host: SshHost, gcs_port: int, head_config: Path) -> dict:
    """deploy/ray/local.yaml with what a user fills in: the head's address and no workers,
    the SSH user and key, the pdserve config the head starts (sent along as a file mount),
    the Ray port (a free one, not 6379), and the head offering both roles (it is the only
    machine). The setup commands stay as shipped."""
    cfg = yaml.safe_load((REPO / "deploy/ray/local.yaml").read_text())
    cfg["provider"].update(head_ip=host.ip, worker_ips=[])
    cfg["auth"] = {"ssh_user": host.user, "ssh_private_key": str(host.key)}
    cfg["file_mounts"]["~/pdserve-head.yaml"] = str(head_config)
    head = cfg["head_start_ray_commands"]
    head = _substitute(head, "--port=6379", f"--port={gcs_port}")
    head = _substitute(head, """--resources='{"prefill_node": 1}'""",
                       f"--resources='{json.dumps({'prefill_node': 1, 'decode_node': 1})}'")
    head = _substitute(head, "--config deploy/ray/pdserve-cpu.yaml", "--config ~/pdserve-head.yaml")
    cfg["head_start_ray_commands"] = head
    assert any("deploy/ensure.sh" in c for c in cfg["setup_commands"])
    return cfg


# -- processes and shared memory of the cluster ---------------------------------------------


def cluster_pids(root: Path) -> set[int]:
    """Processes that name ``root``: on their command line or in their open files (Ray's
    processes and the engines write their logs there), or as their working directory (Redis
    retitles itself, but runs in pdserve's run directory)."""
    found = set(pids_mentioning(str(root)))
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and Path(os.readlink(proc / "cwd")).is_relative_to(root):
                found.add(int(proc.name))
        except OSError:  # gone, or not ours to read
            continue
    return found - {os.getpid()}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "(gone)"


def _kinds(pids: set[int]) -> Counter[str]:
    """How many Ray daemons, Redis servers and vLLM engine cores are among ``pids``."""
    kinds: Counter[str] = Counter()
    for pid in pids:
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        if comm in ("raylet", "gcs_server", "redis-server"):
            kinds[comm] += 1
        elif _cmdline(pid).startswith("VLLM::EngineCore"):
            kinds["engine"] += 1
    return kinds


def _whole(kinds: Counter[str]) -> bool:
    """The head as `ray up` should leave it: Ray's daemons, Redis, and both engine cores."""
    return bool(kinds["raylet"] and kinds["gcs_server"] and kinds["redis-server"] and kinds["engine"] == 2)


def _why_not_whole(root: Path, ours: set[int], kinds: Counter[str]) -> str:
    """What a failed wait for the whole cluster saw, for the assertion message: every engine
    core on the host (ours or not, and where it runs), and the tracebacks and last lines of the
    cluster's Ray logs, which go with the test's temp dir."""
    lines = [f"kinds among our {len(ours)} processes: {dict(kinds)}"]
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and _cmdline(int(proc.name)).startswith("VLLM::EngineCore"):
            try:
                cwd = os.readlink(proc / "cwd")
            except OSError:
                cwd = "?"
            lines.append(f"engine core pid {proc.name} (ours: {int(proc.name) in ours}, cwd {cwd})")
    for log in sorted(root.glob("**/session_2*/logs/*")):  # not session_latest, the link
        if log.suffix not in (".out", ".err", ".log") or not log.is_file():
            continue
        text = log.read_text(errors="replace")
        if "Traceback" in text or "EngineCore" in text or log.name.startswith(("raylet", "serve")):
            lines.append(f"---- {log.name} (last 30 lines) ----")
            lines.extend(text.splitlines()[-30:])
    return "\n".join(lines)[-20000:]


def _shm_mapped_by(pids: set[int]) -> set[Path]:
    """/dev/shm files the given processes map (the store's segment, vLLM's buffers)."""
    found = set()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        for line in maps.splitlines():
            path = line.split(maxsplit=5)[5] if len(line.split(maxsplit=5)) == 6 else ""
            if path.startswith("/dev/shm/"):
                found.add(Path(path.removesuffix(" (deleted)")))
    return found


def _engine_locks_of(pids: set[int]) -> set[Path]:
    """The engines' multiprocessing locks (``/dev/shm/sem.mp-*``) the given processes map."""
    inodes = mapped_shm_inodes(pids=pids)
    locks = set()
    for path in SHM_DIR.glob(f"{ENGINE_LOCKS}*"):
        try:
            if path.stat().st_ino in inodes:
                locks.add(path)
        except OSError:
            continue
    return locks


def _alive(pids: set[int], timeout_s: float) -> set[int]:
    """Those of ``pids`` still alive after up to ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    alive = {p for p in pids if Path(f"/proc/{p}").exists()}
    while alive and time.monotonic() < deadline:
        time.sleep(0.5)
        alive = {p for p in alive if Path(f"/proc/{p}").exists()}
    return alive


def _kill(pids: set[int]) -> None:
    """SIGTERM, a grace period, then SIGKILL: for what a failed run left behind."""
    for sig, grace_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        pids = _alive(pids, grace_s)


def _rays_running() -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "comm").read_text().strip() in ("raylet", "gcs_server"):
                found.append(int(proc.name))
        except OSError:
            continue
    return found


# -- the test -------------------------------------------------------------------------------


@pytest.fixture
def host_root() -> Iterator[Path]:
    # Short: Ray's socket paths under RAY_TMPDIR must fit in 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="rayup-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _prepare_host(root: Path, model_dir: Path) -> dict[str, str]:
    """The remote user's home, and the environment sshd gives every session there."""
    home = root / "home"
    home.mkdir()
    skel = Path("/etc/skel/.bashrc")
    (home / ".bashrc").write_text(skel.read_text() if skel.is_file() else "")
    # The machine already has pdserve's environment: this venv, which deploy/ensure.sh is
    # told about through PDSERVE_VENV (it checks it, installs nothing and links .venv to it),
    # and the default model, converted once (a fresh venv would take ten minutes).
    models = home / ".cache/pdserve/models"
    models.mkdir(parents=True)
    (models / DEFAULT_MODEL_NAME).symlink_to(model_dir)
    return {"HOME": str(home), "RAY_TMPDIR": str(root), "PDSERVE_VENV": str(VENV), "RAY_USAGE_STATS_ENABLED": "0"}


def _ray(args: list[str], env: dict[str, str], log: Path, timeout_s: float) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([RAY, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s,
                          stdin=subprocess.DEVNULL)  # cwd: file_mounts sends "." (this checkout)
    log.write_text(f"{done.stdout}\n--- stderr ---\n{done.stderr}")
    assert done.returncode == 0, f"ray {args[0]} failed (log: {log}):\n{done.stdout[-4000:]}\n{done.stderr[-2000:]}"
    return done


def _ask(base: str, key: str) -> None:
    refused = httpx.post(f"{base}/completions", timeout=120, json={"model": DEFAULT_MODEL_NAME, "prompt": "Hi"})
    assert refused.status_code == 401, refused.text
    auth = {"authorization": f"Bearer {key}"}
    chat = httpx.post(f"{base}/chat/completions", timeout=120, headers=auth, json={
        "model": DEFAULT_MODEL_NAME, "max_tokens": 20, "temperature": 0,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    assert chat.status_code == 200, chat.text
    assert "Paris" in chat.json()["choices"][0]["message"]["content"], chat.text
    completion = httpx.post(f"{base}/completions", timeout=120, headers=auth, json={
        "model": DEFAULT_MODEL_NAME, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0})
    assert completion.status_code == 200, completion.text
    assert completion.json()["choices"][0]["text"].strip(), completion.text


def test_ray_up_local_provider_serves_openai_and_ray_down_leaves_nothing(
    host_root: Path, model_dir: Path, tmp_path: Path,
) -> None:
    if others := _rays_running():
        pytest.fail(f"another Ray runs on this host (pids {others}): `ray up`/`ray down` would stop it too")
    session_env = _prepare_host(host_root, model_dir)
    gcs_port, router_port = free_port(), free_port()
    head_config = tmp_path / "pdserve-head.yaml"
    head_config.write_text(yaml.safe_dump(head_pdserve_config(gcs_port, router_port)))
    client_tmp = tmp_path / "client-tmp"  # the workstation's temp dir: `ray up`'s config cache and state
    client_tmp.mkdir()
    ours: set[int] = set()
    shm: set[Path] = set()
    locks: set[Path] = set()  # bound before the try: its finally adds to it however early a failure came
    began = time.time()  # the engines' ZMQ socket files are the ones made since
    with loopback_sshd(tmp_path / "sshd", session_env) as host:
        config = tmp_path / "cluster.yaml"
        config.write_text(yaml.safe_dump(cluster_yaml(host, gcs_port, head_config), sort_keys=False))
        env = {**{k: v for k, v in os.environ.items() if k != janitor.RPC_ENV},  # as a user runs it
               "PATH": f"{host.bin_dir}:{VENV / 'bin'}:{os.environ['PATH']}",
               "TMPDIR": str(client_tmp), "RAY_TMPDIR": str(client_tmp), "RAY_USAGE_STATS_ENABLED": "0"}
        try:
            up = _ray(["up", "-y", "--no-config-cache", str(config)], env, tmp_path / "ray-up.log", 900)
            assert "pdserve is up: OpenAI base URL" in up.stdout, up.stdout[-4000:]
            home = Path(session_env["HOME"])
            assert (home / "pdserve/.venv").resolve() == VENV.resolve()  # ensure.sh ran on the synced copy
            # Read /proc until the whole cluster shows: one CI run counted one engine core right
            # after "up" (a /proc read that lost a race with the process), and a minute's patience
            # costs nothing when all is well.
            deadline = time.monotonic() + 60
            while not _whole(kinds := _kinds(ours := cluster_pids(host_root))) and time.monotonic() < deadline:
                time.sleep(1)
            assert _whole(kinds), _why_not_whole(host_root, ours, kinds)
            state = RunState.load(home / ".cache/pdserve")
            assert state is not None and state.redis_pid in ours

            key = (home / "pdserve-api-keys").read_text().strip()  # made once by the setup commands
            assert len(key) >= 32 and (home / "pdserve-api-keys").stat().st_mode & 0o077 == 0
            _ask(f"http://127.0.0.1:{router_port}/v1", key)

            ours |= cluster_pids(host_root)
            shm = _shm_mapped_by(ours)
            locks = _engine_locks_of(ours)
            down = _ray(["down", "-y", str(config)], env, tmp_path / "ray-down.log", 300)
            assert "command not found" not in down.stdout, down.stdout[-3000:]  # `ray` is on the head's PATH
            left = _alive(ours, 60) | cluster_pids(host_root)
            assert not left, "`ray down` left processes behind:\n" + "\n".join(f"{p} {_cmdline(p)}" for p in left)
        finally:
            still = cluster_pids(host_root)  # none, unless the test failed before `ray down` ended
            shm |= _shm_mapped_by(still)
            locks |= _engine_locks_of(still)
            _kill(ours | still)
            # Killed processes cannot unlink their shared memory (the store's segment, vLLM's
            # buffers, the engines' locks: `ray stop` kills them, and `ray down` has no hook
            # for `pdserve down`'s sweep): remove what this cluster mapped.
            for segment in shm | locks:
                segment.unlink(missing_ok=True)
            for sock in janitor.orphaned_sockets(janitor.engine_rpc_dir(), min_age_s=0):
                with contextlib.suppress(OSError):  # and those engines' sockets (their agents died too)
                    if sock.lstat().st_mtime >= began:
                        sock.unlink()
