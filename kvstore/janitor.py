"""Shared memory that dead engines leave behind, found and freed.

vLLM's engines talk to their workers over ``multiprocessing`` shared-memory queues
(``/dev/shm/psm_*``, a few hundred MiB per engine). An engine shut down cleanly unlinks them;
an engine whose replica is killed outright cannot, and tmpfs keeps their memory until
someone unlinks them. A segment is an orphan when it is ours (same uid), old enough to be
past any creator's window between creating and mapping it, and no live process maps it.
Each node's store agent sweeps its node periodically; ``pdserve down`` sweeps once at the end.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from kvstore.logging import get_logger

log = get_logger(__name__)

SHM_DIR = Path("/dev/shm")
ENGINE_QUEUES = "psm_"


def mapped_shm_files(proc: Path = Path("/proc")) -> set[str]:
    """Names of the /dev/shm files some live process maps (whatever we may read)."""
    names: set[str] = set()
    for maps in proc.glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # gone, or not ours to read
            continue
        for line in text.splitlines():
            at = line.find("/dev/shm/")
            if at >= 0:
                names.add(line[at + 9 :].removesuffix(" (deleted)"))
    return names


def orphaned_segments(shm_dir: Path = SHM_DIR, prefix: str = ENGINE_QUEUES, min_age_s: float = 60.0,
                      proc: Path = Path("/proc")) -> list[Path]:
    now, uid = time.time(), os.getuid()
    candidates = []
    for path in shm_dir.glob(f"{prefix}*"):
        try:
            st = path.stat()
        except OSError:
            continue
        if st.st_uid == uid and now - st.st_mtime >= min_age_s:
            candidates.append(path)
    if not candidates:
        return []
    mapped = mapped_shm_files(proc)
    return [p for p in candidates if p.name not in mapped]


def sweep(shm_dir: Path = SHM_DIR, min_age_s: float = 60.0) -> int:
    """Unlink the orphaned engine queues; how many bytes that freed."""
    freed = 0
    for path in orphaned_segments(shm_dir, min_age_s=min_age_s):
        try:
            size = path.stat().st_size
            path.unlink()
        except OSError:
            continue
        freed += size
        log.warning("freed %s (%d MiB): shared memory of an engine that did not shut down", path.name, size >> 20)
    return freed
