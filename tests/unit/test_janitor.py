import os
import time
from pathlib import Path

import pytest

from kvstore import janitor


def make_proc(root: Path, maps: dict[int, str]) -> Path:
    for pid, text in maps.items():
        (root / str(pid)).mkdir(parents=True)
        (root / str(pid) / "maps").write_text(text)
    return root


def test_only_old_unmapped_engine_queues_and_locks_are_orphans(tmp_path: Path) -> None:
    shm = tmp_path / "shm"
    shm.mkdir()
    names = ("psm_live", "psm_dead", "psm_young", "pdkv-store", "sem.mp-live", "sem.mp-dead", "sem.other")
    for name in names:
        (shm / name).write_bytes(b"x" * 1024)
    old = time.time() - 120
    for name in names:
        if name != "psm_young":
            os.utime(shm / name, (old, old))
    ino = {name: (shm / name).stat().st_ino for name in names}
    # A semaphore's holder maps it under the temporary name glibc created it with: same inode.
    (shm / "sem.tmp1").hardlink_to(shm / "sem.mp-live")
    (shm / "sem.tmp1").unlink()
    proc = make_proc(tmp_path / "proc", {
        11: f"7f00-7f10 rw-s 00000000 00:1a {ino['psm_live']} {shm}/psm_live\n"
            "7f20-7f30 r-xp 0 08:01 9 /usr/lib/libc.so\n",
        12: f"7f00-7f10 rw-s 00000000 00:1a {ino['pdkv-store']} {shm}/pdkv-store (deleted)\n",
        13: f"7f40-7f41 rw-s 00000000 00:1a {ino['sem.mp-live']} {shm}/sem.tmp1 (deleted)\n",
    })
    got = janitor.orphaned_segments(shm, min_age_s=60, proc=proc)
    # mapped, too young, or not an engine's: left alone
    assert got == [shm / "psm_dead", shm / "sem.mp-dead"]
    assert janitor.mapped_shm_inodes(proc, shm) == {ino["psm_live"], ino["pdkv-store"], ino["sem.mp-live"]}


def test_a_live_multiprocessing_lock_is_mapped_by_its_holder() -> None:
    """What the sweep relies on, on this machine's glibc: an open named semaphore's inode
    shows in its holder's maps, and a sweep leaves it alone."""
    import multiprocessing

    lock = multiprocessing.get_context("spawn").Lock()  # named, linked until the tracker unlinks it
    name = lock._semlock.name  # type: ignore[attr-defined]
    path = janitor.SHM_DIR / f"sem.{name.lstrip('/')}"
    assert path.stat().st_ino in janitor.mapped_shm_inodes()
    assert path not in janitor.orphaned_segments(min_age_s=0)


def test_an_engine_socket_nothing_is_bound_to_is_an_orphan_and_swept(tmp_path: Path) -> None:
    """The ZMQ ipc files a killed engine leaves: swept once no live socket is bound to them
    (this process's real sockets, read back from /proc/net/unix)."""
    import socket

    rpc = tmp_path / "rpc"
    rpc.mkdir()
    live, dead, young = (socket.socket(socket.AF_UNIX) for _ in range(3))
    live.bind(str(rpc / "live"))
    dead.bind(str(rpc / "dead"))
    young.bind(str(rpc / "young"))
    dead.close()  # its file stays: what a killed engine leaves
    young.close()
    (rpc / "plain").write_text("not a socket")
    old = time.time() - 120
    for name in ("live", "dead", "plain"):
        os.utime(rpc / name, (old, old))
    try:
        assert str(rpc / "live") in janitor.bound_socket_paths()
        assert janitor.orphaned_sockets(rpc, min_age_s=60) == [rpc / "dead"]
        assert janitor.orphaned_sockets(rpc, min_age_s=0) == [rpc / "dead", rpc / "young"]
        janitor.sweep(tmp_path / "no-shm", min_age_s=0, rpc_dir=rpc)
        assert sorted(p.name for p in rpc.iterdir()) == ["live", "plain"]
    finally:
        live.close()


def test_engines_are_pointed_at_the_rpc_dir_unless_the_user_chose_one(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(janitor.RPC_ENV, raising=False)
    d = janitor.use_engine_rpc_dir(tmp_path)
    assert d == janitor.engine_rpc_dir(tmp_path) and d.is_dir() and (d.stat().st_mode & 0o777) == 0o700
    assert os.environ[janitor.RPC_ENV] == str(d)
    monkeypatch.setenv(janitor.RPC_ENV, str(tmp_path / "mine"))
    assert janitor.use_engine_rpc_dir(tmp_path) == tmp_path / "mine"
    assert os.environ[janitor.RPC_ENV] == str(tmp_path / "mine")
