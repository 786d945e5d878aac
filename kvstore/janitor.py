"""Shared memory and sockets that dead engines leave behind, found and freed.

vLLM's engines talk to their workers over ``multiprocessing`` shared-memory queues
(``/dev/shm/psm_*``, a few hundred MiB per engine), and their spawned processes share
``multiprocessing`` locks, POSIX named semaphores (``/dev/shm/sem.mp-*``, which the resource
tracker of a spawning process unlinks when it exits). An engine shut down cleanly unlinks
them; an engine whose replica is killed outright (its resource tracker with it) cannot, and
tmpfs keeps them until someone unlinks them: each full test run left four semaphores. A
segment is an orphan when it is ours (same uid), old enough to be past any creator's window
between creating and mapping it, and no live process maps it. Each node's store agent sweeps
its node periodically; ``pdserve down`` sweeps once at the end.

The engine's front end and its core also talk over ZMQ ``ipc://`` sockets, one file each in
``VLLM_RPC_BASE_PATH`` (the temp dir's top level by default, under a fresh UUID); a killed
engine leaves them there, past telling from anyone else's. pdserve's engines put them in a
directory of their own (``use_engine_rpc_dir``), and a socket file there that no live socket
is bound to (``/proc/net/unix``) is an orphan, swept with the rest.
"""

from __future__ import annotations

import os
import stat
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from kvstore.logging import get_logger

log = get_logger(__name__)

SHM_DIR = Path("/dev/shm")
ENGINE_QUEUES = "psm_"
ENGINE_LOCKS = "sem.mp-"  # sem_open("/mp-...") names /dev/shm/sem.mp-...; live: its inode is mapped
ENGINE_LEFTOVERS = (ENGINE_QUEUES, ENGINE_LOCKS)
RPC_ENV = "VLLM_RPC_BASE_PATH"
NET_UNIX = Path("/proc/net/unix")


def engine_rpc_dir(base: Path | None = None) -> Path:
    """This uid's directory for its engines' ZMQ sockets on this node (not created here)."""
    return (base or Path(tempfile.gettempdir())) / f"pdserve-rpc-{os.getuid()}"


def use_engine_rpc_dir(base: Path | None = None) -> Path:
    """Point the engines this process starts (they inherit its environment) at
    ``engine_rpc_dir`` unless ``VLLM_RPC_BASE_PATH`` is set already; the directory in use."""
    if RPC_ENV in os.environ:
        return Path(os.environ[RPC_ENV])
    d = engine_rpc_dir(base)
    d.mkdir(mode=0o700, exist_ok=True)
    os.environ[RPC_ENV] = str(d)
    return d


def bound_socket_paths(net_unix: Path = NET_UNIX) -> set[str]:
    """The paths that live Unix sockets in this network namespace are bound to."""
    try:
        lines = net_unix.read_text().splitlines()[1:]
    except OSError:
        return set()
    # Num RefCount Protocol Flags Type St Inode [Path]
    return {fields[7] for fields in (line.split(maxsplit=7) for line in lines) if len(fields) == 8}


def orphaned_sockets(rpc_dir: Path, min_age_s: float = 60.0, net_unix: Path = NET_UNIX) -> list[Path]:
    """Socket files of ours in ``rpc_dir``, older than ``min_age_s``, that no live socket is
    bound to."""
    try:
        entries = sorted(rpc_dir.iterdir())
    except OSError:  # never made on this node
        return []
    candidates = [path for path, st in _ours_and_old(entries, min_age_s) if stat.S_ISSOCK(st.st_mode)]
    if not candidates:
        return []
    bound = bound_socket_paths(net_unix)
    return [path for path in candidates if str(path) not in bound]


def mapped_shm_inodes(proc: Path = Path("/proc"), shm_dir: Path = SHM_DIR,
                      pids: Iterable[int] | None = None) -> set[int]:
    """Inodes of the files in ``shm_dir`` some live process (of ``pids``, where given) maps,
    whatever we may read. By inode, not name: glibc creates a named semaphore under a
    temporary name, maps it, links it to its real name and unlinks the temporary one, so its
    holders' maps name a deleted file (``/dev/shm/sem.t0ySmq (deleted)``) that is the same
    inode as ``sem.mp-...``."""
    prefix = f" {shm_dir}/"
    inodes: set[int] = set()
    for maps in proc.glob("[0-9]*/maps") if pids is None else (proc / str(pid) / "maps" for pid in pids):
        try:
            text = maps.read_text()
        except OSError:  # gone, or not ours to read
            continue
        for line in text.splitlines():
            if prefix in line:
                fields = line.split(maxsplit=5)  # address perms offset device inode path
                if len(fields) == 6 and fields[4].isdigit():
                    inodes.add(int(fields[4]))
    return inodes


def orphaned_segments(shm_dir: Path = SHM_DIR, prefixes: tuple[str, ...] = ENGINE_LEFTOVERS,
                      min_age_s: float = 60.0, proc: Path = Path("/proc")) -> list[Path]:
    paths = sorted(p for prefix in prefixes for p in shm_dir.glob(f"{prefix}*"))
    candidates = [(path, st.st_ino) for path, st in _ours_and_old(paths, min_age_s)]
    if not candidates:
        return []
    mapped = mapped_shm_inodes(proc, shm_dir)
    return [path for path, inode in candidates if inode not in mapped]


def _ours_and_old(paths: Iterable[Path], min_age_s: float) -> list[tuple[Path, os.stat_result]]:
    """The ones of ``paths`` this uid owns, unchanged for ``min_age_s`` (past any creator's
    window between making a file and using it), with their stat; gone ones skipped."""
    now, uid = time.time(), os.getuid()
    out = []
    for path in paths:
        try:
            st = path.lstat()
        except OSError:
            continue
        if st.st_uid == uid and now - st.st_mtime >= min_age_s:
            out.append((path, st))
    return out


def sweep(shm_dir: Path = SHM_DIR, min_age_s: float = 60.0, rpc_dir: Path | None = None) -> int:
    """Unlink the orphaned engine queues, locks and sockets; how many bytes that freed."""
    freed = 0
    for path in orphaned_segments(shm_dir, min_age_s=min_age_s):
        try:
            size = path.stat().st_size
            path.unlink()
        except OSError:
            continue
        freed += size
        log.warning("freed %s (%d MiB): shared memory of an engine that did not shut down", path.name, size >> 20)
    sockets = 0
    for path in orphaned_sockets(rpc_dir or engine_rpc_dir(), min_age_s=min_age_s):
        try:
            path.unlink()
        except OSError:
            continue
        sockets += 1
    if sockets:
        log.warning("removed %d ZMQ sockets of engines that did not shut down", sockets)
    return freed
