"""An SSH host on loopback for `ray up`: an sshd of the test's own (its own host key, client
key, config and authorized_keys, all in one directory) on a free port of 127.0.0.1. The
machine's own SSH configuration and ~/.ssh are neither read nor written.

Ray's SSH command runner has no port option: it runs `ssh` (and `rsync --rsh ssh`) from the
PATH with `-i KEY -o ...` and `user@ip`, and its `auth` section offers only a key, a user and
a ProxyCommand. So the port comes from an ssh client config of our own: ``bin_dir`` holds an
`ssh` that runs the system's ssh with ``-F`` that config, and `ray up` / `ray down` run with
``bin_dir`` first on their PATH. ``-F`` also keeps the user's ~/.ssh/config and
/etc/ssh/ssh_config out of the test.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cluster.runtime import free_port, wait_until

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"  # /usr/sbin is not on every user's PATH
PRIVSEP_DIR = Path("/run/sshd")  # compiled into Debian's sshd; normally made by its service unit


@dataclass(frozen=True)
class SshHost:
    ip: str
    port: int
    user: str
    key: Path  # the client's private key (the YAML's auth.ssh_private_key)
    bin_dir: Path  # put first on PATH: its `ssh` reaches this host's port
    log: Path  # sshd's own log


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "pdserve-test", "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL)


def _write_config(d: Path, port: int, user: str, session_env: dict[str, str]) -> Path:
    # SetEnv overrides sshd's defaults (HOME, PATH) in every session: the remote user's home
    # (so `~` in the YAML) is a directory of the test's, not this user's real one.
    env = " ".join(f'"{k}={v}"' for k, v in session_env.items())
    config = d / "sshd_config"
    config.write_text(
        f"ListenAddress 127.0.0.1:{port}\n"
        f"HostKey {d / 'host_key'}\n"
        f"PidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\n"
        f"AllowUsers {user}\n"
        "PermitRootLogin prohibit-password\n"
        "PubkeyAuthentication yes\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "UsePAM no\n"
        # Our files live under /tmp (world-writable): StrictModes would refuse them.
        "StrictModes no\n"
        "MaxStartups 100\n"
        "MaxSessions 100\n"
        "Subsystem sftp internal-sftp\n"
        f"SetEnv {env}\n"
    )
    return config


def _write_client(d: Path, port: int) -> Path:
    client_config = d / "ssh_config"
    client_config.write_text(f"Host 127.0.0.1\n  Port {port}\n")
    bin_dir = d / "bin"
    bin_dir.mkdir()
    ssh = bin_dir / "ssh"
    ssh.write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {client_config} "$@"\n')
    ssh.chmod(0o755)
    return bin_dir


def _accepts(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
        return s.recv(4).startswith(b"SSH-")


@contextmanager
def loopback_sshd(d: Path, session_env: dict[str, str]) -> Iterator[SshHost]:
    """Run sshd on a free loopback port for the current user, with ``session_env`` set in
    every session; stopped by its PID on exit."""
    for tool in (SSHD, "ssh", "ssh-keygen", "rsync"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is missing: apt-get install -y openssh-server rsync (deploy/test.sh does)")
    d.mkdir(parents=True, exist_ok=True)
    user = getpass.getuser()
    _keygen(d / "host_key")
    _keygen(d / "client_key")
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    port = free_port()
    config = _write_config(d, port, user, session_env)
    if os.geteuid() == 0:
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
    log = d / "sshd.log"
    with log.open("w") as err:
        sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)],
                                stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: sshd.poll() is None and _accepts(port), 15, f"sshd (log: {log})")
        yield SshHost("127.0.0.1", port, user, d / "client_key", _write_client(d, port), log)
    finally:
        sshd.send_signal(signal.SIGTERM)  # the listener only: sessions end with their clients
        try:
            sshd.wait(10)
        except subprocess.TimeoutExpired:
            sshd.kill()
            sshd.wait()

