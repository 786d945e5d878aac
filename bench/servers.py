"""The systems under test, each as a context manager that starts it, waits until it
really answers, yields its base URL, and always stops what it started.

- pdserve: the real CLI (`pdserve up` / `pdserve down`) with a private PDSERVE_HOME, so its
  state file, Redis and Ray temp dir are this run's own and `down` stops exactly those.
- monolithic: one vLLM OpenAI server on both cores, in its own session, killed by process
  group. It is spawned as a separate interpreter so no bench/ module imports torch or vLLM.
- rayllm / rayllm_pd: Ray Serve LLM's own apps (``bench.peers.rayllm``: colocated, and its
  prefill/decode app), a private Ray in its own session, killed the same way.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.peers.env import cpu_engine_env

_UP_LINE = re.compile(r"pdserve is up: OpenAI base URL (\S+)")


class SystemStartError(RuntimeError):
    pass


@dataclass
class Running:
    name: str
    base_url: str
    startup_s: float
    log_path: str
    notes: list[str] = field(default_factory=list)  # cleanup anomalies, for the JSON


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    # The venv's own scripts, next to this interpreter. Not resolved: resolving the python
    # symlink would leave the venv.
    return str(Path(sys.executable).parent / name)


def log_tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError as e:
        return f"(no log: {e})"


def completion_ok(base_url: str, model: str, timeout_s: float = 30.0) -> bool:
    """A real one-token completion. Readiness means the engine answers, not that HTTP is up:
    vLLM's /v1/models and Serve's routes answer well before the engines can serve."""
    body = {"model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0.0}
    try:
        r = httpx.post(base_url.rstrip("/") + "/completions", json=body, timeout=timeout_s)
        return r.status_code == 200 and bool(r.json().get("choices"))
    except (httpx.HTTPError, ValueError):
        return False


def wait_ready(base_url: str, model: str, deadline: float, alive: Callable[[], bool],
                log: Path, what: str) -> None:
    while time.monotonic() < deadline:
        if not alive():
            raise SystemStartError(f"{what} exited before it answered; log tail:\n{log_tail(log)}")
        if completion_ok(base_url, model):
            return
        time.sleep(1.0)
    raise SystemStartError(f"{what} did not answer a completion in time; log tail:\n{log_tail(log)}")


# -- process helpers ----------------------------------------------------------------------


def _pids_where(pred: Callable[[int], bool]) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if pred(int(entry)):
                    pids.append(int(entry))
            except OSError:  # the process went away while we looked
                continue
    return pids


def _session_of(pid: int) -> int:
    # /proc/PID/stat: "pid (comm) state ppid pgrp session ..."; comm may hold spaces.
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[3])


def _cmdline_has(pid: int, text: str) -> bool:
    return text.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()


def _kill_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


# -- pdserve ------------------------------------------------------------------------------


@contextmanager
def pdserve_system(model_dir: Path, model: str, log_dir: Path, sets: list[str],
                   extra_env: dict[str, str] | None = None,
                   up_timeout_s: float = 600.0, log_name: str = "pdserve") -> Iterator[Running]:
    home = Path(tempfile.mkdtemp(prefix="pdbench-home-"))
    # extra_env reaches `up` and `down` alike: both talk to the same Ray cluster.
    env = {**os.environ, **(extra_env or {}), "PDSERVE_HOME": str(home)}
    log = log_dir / f"{log_name}.log"
    cmd = [_bin("pdserve"), "up", "--set", f"model={model_dir}"]
    for s in sets:
        cmd += ["--set", s]
    running = Running(log_name, "", 0.0, str(log))
    state_file = home / "run" / "state.json"
    state: dict[str, object] = {}
    try:
        t0 = time.monotonic()
        # Output goes to a file, not a pipe: `up` leaves daemons (Ray, Redis) behind that may
        # inherit its descriptors, and a pipe would then never reach EOF.
        with log.open("w") as out:
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
            try:
                rc = proc.wait(timeout=up_timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise SystemStartError(f"`pdserve up` ran over {up_timeout_s:.0f}s; log tail:\n"
                                       f"{log_tail(log)}") from None
        text = log.read_text(errors="replace")
        if state_file.is_file():
            state = json.loads(state_file.read_text())
        if rc != 0:
            raise SystemStartError(f"`{' '.join(cmd)}` exited {rc}; its output:\n{text}")
        m = _UP_LINE.search(text)
        if m is None:
            raise SystemStartError(f"`pdserve up` printed no base URL; its output:\n{text}")
        running.base_url = m.group(1)
        wait_ready(running.base_url, model, time.monotonic() + 120, lambda: True, log,
                    "pdserve")
        running.startup_s = time.monotonic() - t0
        yield running
    finally:
        if not state and state_file.is_file():
            state = json.loads(state_file.read_text())
        with log.open("a") as out:
            out.write("\n==== pdserve down ====\n")
            out.flush()
            try:
                done = subprocess.run([_bin("pdserve"), "down"], env=env, stdout=out,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      timeout=180)
                if done.returncode != 0:
                    running.notes.append(f"`pdserve down` exited {done.returncode}")
            except subprocess.TimeoutExpired:
                running.notes.append("`pdserve down` ran over 180 s")
        running.notes += _reap_pdserve(state)
        for note in running.notes:
            print(f"[bench] pdserve cleanup: {note}", file=sys.stderr, flush=True)
        shutil.rmtree(home, ignore_errors=True)


def _reap_pdserve(state: dict[str, object]) -> list[str]:
    """After `down`: anything of this run still alive is a pdserve bug worth reporting.
    Ours only: processes naming this run's unique Ray temp dir, and this run's Redis PID."""
    notes: list[str] = []
    temp_dir = str(state.get("ray_temp_dir") or "")
    redis_pid = int(state.get("redis_pid") or 0)  # type: ignore[call-overload]

    def ours(pid: int) -> bool:
        return (bool(temp_dir) and _cmdline_has(pid, temp_dir)) or pid == redis_pid

    left = _pids_where(ours)
    if left:
        notes.append(f"{len(left)} process(es) survived `pdserve down` ({left}); killed them")
        _kill_all(left, signal.SIGTERM)
        time.sleep(5)
        _kill_all(_pids_where(ours), signal.SIGKILL)
    if temp_dir and Path(temp_dir).exists():
        notes.append(f"Ray temp dir {temp_dir} was left behind; removed it")
        shutil.rmtree(temp_dir, ignore_errors=True)
    return notes


# -- monolithic vLLM ----------------------------------------------------------------------


@contextmanager
def monolithic_system(model_dir: Path, model: str, log_dir: Path,
                      start_timeout_s: float = 600.0) -> Iterator[Running]:
    port = free_port()
    log = log_dir / "monolithic.log"
    # Both cores for one engine, none reserved for the frontend: the fair peer of pdserve's
    # two one-core engines (see shared/ENVIRONMENT.md, "CPU binding decides speed").
    env = {**os.environ, **cpu_engine_env("0-1")}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", model, "--dtype", "float32", "--block-size", "32",
           "--max-model-len", "2048", "--enforce-eager", "--port", str(port),
           "--host", "127.0.0.1"]
    running = Running("monolithic", f"http://127.0.0.1:{port}/v1", 0.0, str(log))
    out = log.open("w")
    out.write(" ".join(cmd) + "\n")
    out.flush()
    t0 = time.monotonic()
    # Its own session: the engine-core processes it spawns share it, so one killpg stops all.
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_ready(running.base_url, model, t0 + start_timeout_s, lambda: proc.poll() is None,
                    log, "the vLLM server")
        running.startup_s = time.monotonic() - t0
        yield running
    finally:
        running.notes += stop_session(proc)
        out.close()
        for note in running.notes:
            print(f"[bench] monolithic cleanup: {note}", file=sys.stderr, flush=True)


def stop_session(proc: subprocess.Popen[bytes]) -> list[str]:
    sid = proc.pid
    notes: list[str] = []
    for sig, grace_s in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(sid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            proc.poll()
            if not _pids_where(lambda p: _session_of(p) == sid):
                return notes
            time.sleep(0.3)
        notes.append(f"processes of session {sid} outlived {signal.Signals(sig).name}")
    # Spawned children that left the process group but kept the session.
    _kill_all(_pids_where(lambda p: _session_of(p) == sid), signal.SIGKILL)
    return notes


# -- Ray Serve LLM ------------------------------------------------------------------------


@contextmanager
def rayllm_system(mode: str, model_dir: Path, model: str, log_dir: Path,
                  start_timeout_s: float = 600.0) -> Iterator[Running]:
    """Ray Serve LLM, ``mode`` colocated (``build_openai_app``) or pd (``build_pd_openai_app``),
    with the same model, cores and KV budget as the others (``bench.peers.rayllm``)."""
    from bench.peers.env import rayllm_env

    name = "rayllm" if mode == "colocated" else "rayllm_pd"
    port = free_port()
    log = log_dir / f"{name}.log"
    kv_dir = tempfile.mkdtemp(prefix="rayllm-kv-", dir="/dev/shm")  # the P/D app's KV files
    cmd = [sys.executable, "-m", "bench.peers.rayllm", "--mode", mode, "--model-dir", str(model_dir),
           "--model", model, "--port", str(port), "--kv-dir", kv_dir]
    running = Running(name, f"http://127.0.0.1:{port}/v1", 0.0, str(log))
    env = rayllm_env()
    out = log.open("w")
    out.write(" ".join(cmd) + "\n")
    out.flush()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, cwd=str(Path(__file__).resolve().parents[1]), stdout=out,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_ready(running.base_url, model, t0 + start_timeout_s, lambda: proc.poll() is None,
                    log, f"Ray Serve LLM ({mode})")
        running.startup_s = time.monotonic() - t0
        yield running
    finally:
        running.notes += stop_session(proc)  # SIGTERM: the app shuts Serve and Ray down
        out.close()
        shutil.rmtree(kv_dir, ignore_errors=True)
        # vLLM's queues and locks of engines that SIGKILL ended (only what no live process maps).
        from kvstore import janitor

        if freed := janitor.sweep(min_age_s=0):
            running.notes.append(f"freed {freed >> 20} MiB of shared memory its engines left behind")
        for note in running.notes:
            print(f"[bench] {name} cleanup: {note}", file=sys.stderr, flush=True)
