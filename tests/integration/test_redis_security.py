"""The Redis pdserve starts takes only clients with its password, and the password shows
nowhere another user of the host could read it: not on the command line, not in a file
anyone but us can open, not in what `pdserve` prints."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import redis

from cluster.runtime import RunState, redacted, start_redis, stop_pid, url_password


def test_redis_refuses_clients_without_the_password_and_hides_it(tmp_path: Path) -> None:
    url, port, pid = start_redis(tmp_path)
    try:
        password = url_password(url)
        assert password and len(password) >= 24
        assert redis.Redis.from_url(url).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port, password="wrong").ping()
        assert password.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        (conf,) = tmp_path.glob("redis-*.conf")
        assert stat.S_IMODE(conf.stat().st_mode) == 0o600
        assert password not in redacted(url)
        RunState(redis_url=url).save(tmp_path)  # the run state carries the URL: ours alone to read
        assert stat.S_IMODE(RunState.path(tmp_path).stat().st_mode) == 0o600
    finally:
        stop_pid(pid)
