import os
import time
from pathlib import Path

from kvstore import janitor


def make_proc(root: Path, maps: dict[int, str]) -> Path:
    for pid, text in maps.items():
        (root / str(pid)).mkdir(parents=True)
        (root / str(pid) / "maps").write_text(text)
    return root


def test_only_old_unmapped_engine_queues_are_orphans(tmp_path: Path) -> None:
    shm = tmp_path / "shm"
    shm.mkdir()
    for name in ("psm_live", "psm_dead", "psm_young", "pdkv-store"):
        (shm / name).write_bytes(b"x" * 1024)
    old = time.time() - 120
    for name in ("psm_live", "psm_dead", "pdkv-store"):
        os.utime(shm / name, (old, old))
    proc = make_proc(tmp_path / "proc", {
        11: "7f00-7f10 rw-s 00000000 00:1a 5 /dev/shm/psm_live\n7f20-7f30 r-xp 0 08:01 9 /usr/lib/libc.so\n",
        12: "7f00-7f10 rw-s 00000000 00:1a 6 /dev/shm/pdkv-store (deleted)\n",
    })
    got = janitor.orphaned_segments(shm, min_age_s=60, proc=proc)
    assert got == [shm / "psm_dead"]  # mapped, too young, or not an engine queue: left alone
    assert janitor.mapped_shm_files(proc) == {"psm_live", "pdkv-store"}
