"""Processes `pdserve up` starts and `pdserve down` stops: a Ray head and a Redis server (the
Store Agents are Ray actors: ``cluster.store_nodes``). Everything started is recorded in a state file, so `down` stops
exactly that (by PID or by our own unique paths) and nothing else on the host.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

from cluster.env import pdserve_home
from cluster.log import get_logger
from kvstore.metadata import redis_password

log = get_logger(__name__)

T = TypeVar("T")


class StartError(Exception):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.2) -> T:
    """Poll ``check`` until it returns a truthy value (returned) or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as e:  # the thing is not up yet
            last = e
        time.sleep(interval_s)
    raise StartError(f"timed out after {timeout_s:.0f}s waiting for {what}" + (f": {last}" if last else ""))


@dataclass
class RunState:
    ray_address: str = ""
    ray_temp_dir: str = ""  # set only when `up` started the Ray head
    redis_url: str = ""
    redis_pid: int = 0  # set only when `up` started Redis
    redis_port: int = 0
    url: str = ""
    app_name: str = "pdserve"
    agents: list[str] = field(default_factory=list)
    metrics_targets: list[str] = field(default_factory=list)  # each node's Ray metrics export (host:port) at `up`

    @staticmethod
    def path(home: Path | None = None) -> Path:
        """The state file under ``home`` (default: $PDSERVE_HOME)."""
        return (home or pdserve_home()) / "run" / "state.json"

    def save(self, home: Path | None = None) -> None:
        p = self.path(home)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # it holds Redis' password
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(asdict(self), indent=2))
        tmp.replace(p)

    @classmethod
    def load(cls, home: Path | None = None) -> RunState | None:
        p = cls.path(home)
        return cls(**json.loads(p.read_text())) if p.is_file() else None

    @classmethod
    def clear(cls, home: Path | None = None) -> None:
        cls.path(home).unlink(missing_ok=True)


# -- Redis --------------------------------------------------------------------------------


def start_redis(run_dir: Path, port: int | None = None, password: str | None = None) -> tuple[str, int, int]:
    """A private Redis on a loopback port (a free one by default), daemonized: it outlives
    this process until `pdserve down` stops it by pid. It takes only clients that present
    ``password`` (a new random one by default), which its URL carries. Returns (url, port, pid)."""
    args, pidfile, port, url = _redis_command(run_dir, port, password or new_secret(), ("127.0.0.1",))
    subprocess.run([*args, "--daemonize", "yes"], check=True, stdout=subprocess.DEVNULL)
    return _wait_for_redis(pidfile, port, url)


def start_redis_child(run_dir: Path, host: str = "127.0.0.1") -> tuple[subprocess.Popen[bytes], str, int]:
    """A private Redis on a free port of ``host`` (and loopback) as this thread's child,
    which the kernel SIGTERMs when this thread ends (PR_SET_PDEATHSIG; Linux), however it
    ends; a new random password. Returns (process, url, port)."""
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before the fork: the child only calls it

    def die_with_parent() -> None:
        prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG

    binds = ("127.0.0.1",) if host == "127.0.0.1" else (host, "127.0.0.1")
    args, pidfile, port, url = _redis_command(run_dir, None, new_secret(), binds)
    proc = subprocess.Popen([*args, "--daemonize", "no"], cwd=run_dir, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=die_with_parent)
    try:
        url, port, _pid = _wait_for_redis(pidfile, port, url)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, url, port


def new_secret() -> str:
    return secrets.token_urlsafe(24)


def _redis_command(run_dir: Path, port: int | None, password: str,
                   binds: tuple[str, ...]) -> tuple[list[str], Path, int, str]:
    """redis-server's arguments, its pid file, port and URL. The password goes in a config
    file only we can read, never on the command line (which every user of the host sees)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise StartError("redis-server is not installed (apt-get install -y redis-server), "
                         "or set kvstore.redis_url to an existing Redis")
    port = port or free_port()
    pidfile = run_dir / f"redis-{port}.pid"
    run_dir.mkdir(parents=True, exist_ok=True)
    pidfile.unlink(missing_ok=True)  # a killed Redis on this port leaves its pid behind
    conf = run_dir / f"redis-{port}.conf"
    conf.unlink(missing_ok=True)
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"requirepass {password}\n")
    url = f"redis://:{quote(password, safe='')}@{binds[0]}:{port}/0"
    return ([binary, str(conf), "--port", str(port), "--bind", *binds, "--save", "", "--appendonly", "no",
             "--pidfile", str(pidfile), "--dir", str(run_dir)], pidfile, port, url)


def redacted(url: str) -> str:
    """``url`` with its password replaced, for anything printed or logged."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def url_password(url: str) -> str | None:
    """The password a Redis URL carries (to start a Redis again with the same one)."""
    return redis_password(url)


def _wait_for_redis(pidfile: Path, port: int, url: str) -> tuple[str, int, int]:
    pid = wait_until(lambda: pidfile.is_file() and int(pidfile.read_text().strip() or 0), 10, "redis")
    import redis

    wait_until(lambda: redis.Redis.from_url(url, socket_timeout=1).ping(), 10, "redis PING")
    return url, port, int(pid)


def stop_pid(pid: int, timeout_s: float = 10.0) -> None:
    if pid <= 0:
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# -- Ray ----------------------------------------------------------------------------------


# What `ray start` prints when the node gave up waiting for its own GCS: a loaded machine (seen
# once in CI on 2 cores, 2026-12-04: "Failed to get node info b'RPC error: Deadline Exceeded'"
# after 31 s), not a bad setting, so it is worth one more try.
_RAY_START_TIMED_OUT = ("timed out during startup", "Deadline Exceeded")


def start_ray_head(num_cpus: int | None = None, attempts: int = 2) -> tuple[str, str]:
    """`ray start --head` with a temp dir of our own; returns (address, temp_dir). A start
    that timed out waiting for its own GCS is stopped and tried again with fresh ports and
    temp dir, up to ``attempts`` in all; any other failure raises at once."""
    for attempt in range(1, attempts + 1):
        temp_dir = f"/tmp/pdray-{uuid.uuid4().hex[:8]}"  # short: Ray's socket paths must fit 107 B
        port = free_port()
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={port}",
               f"--temp-dir={temp_dir}", "--include-dashboard=false", "--disable-usage-stats",
               f"--ray-client-server-port={free_port()}", f"--node-manager-port={free_port()}",
               f"--object-manager-port={free_port()}"]
        if num_cpus is not None:
            cmd.append(f"--num-cpus={num_cpus}")
        done = subprocess.run(cmd, capture_output=True, text=True,
                              env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
        if done.returncode == 0:
            return f"127.0.0.1:{port}", temp_dir
        stop_ray(temp_dir)
        said = f"{done.stdout}\n{done.stderr}"
        if attempt == attempts or not any(s in said for s in _RAY_START_TIMED_OUT):
            raise StartError(f"ray start failed:\n{said}")
        log.warning("ray start timed out waiting for its GCS (attempt %d of %d): starting it again", attempt,
                    attempts)
    raise ValueError(f"attempts must be at least 1, not {attempts}")


def serve_replica_pids(app: str, deployment: str = "") -> list[int]:
    """PIDs of the Serve replicas of ``app``'s ``deployment`` (all of the app's with ""): Ray
    titles an actor's worker process with its class, ``ray::ServeReplica:<app>:<deployment>``.
    The engine processes a replica spawns carry titles of their own and are not counted."""
    return pids_titled(f"ServeReplica:{app}:{deployment}")


def pids_titled(needle: str) -> list[int]:
    """PIDs whose command line (Ray's process title for an actor: ``ray::<Class>``) holds ``needle``."""
    raw = needle.encode()
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if raw in Path(f"/proc/{entry}/cmdline").read_bytes():
                    pids.append(int(entry))
            except OSError:  # the process is gone, or not ours to look at
                continue
    return pids


def pids_mentioning(text: str) -> list[int]:
    """PIDs whose command line or open files name ``text`` (our own unique paths, never a bare
    name). Open files matter: Ray's agents retitle themselves (``ray::DashboardAgent``), so
    their command line no longer names the temp dir, but they keep its log files open."""
    needle = text.encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if needle in Path(f"/proc/{entry}/cmdline").read_bytes() or _has_open_file(entry, text):
                pids.append(int(entry))
        except OSError:  # the process is gone, or not ours to look at
            continue
    return pids


def _has_open_file(pid: str, text: str) -> bool:
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            if text in os.readlink(f"{fd_dir}/{fd}"):
                return True
        except OSError:
            continue
    return False


def stop_ray(temp_dir: str) -> None:
    """Stop the Ray processes of the head we started: each one names our temp dir."""
    if not temp_dir:
        return
    for sig, grace_s in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        pids = pids_mentioning(temp_dir)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while pids and pids_mentioning(temp_dir) and time.monotonic() < deadline:
            time.sleep(0.3)
    shutil.rmtree(temp_dir, ignore_errors=True)


def ray_metrics_targets() -> list[str]:
    """Each live node's Ray metrics export, ``host:port``: what a Prometheus scrapes for
    ``ray_pdserve_*`` and ``ray_vllm_*`` (Ray's own service discovery file exists only where
    Ray's dashboard runs). Needs a connected ``ray``."""
    import ray

    return [f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}" for n in ray.nodes()
            if n.get("Alive") and n.get("MetricsExportPort")]
