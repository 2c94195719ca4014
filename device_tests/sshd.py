"""A throwaway sshd on loopback standing in for a board: Debian's openssh-server (installed
with apt-get when missing), a host key and a user key made for the occasion, root login by
that key only, on a free port of 127.0.0.1. ``with loopback_sshd(tmp) as board: ...``."""
from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from edgepeft.errors import BackendError

SSHD = Path("/usr/sbin/sshd")


@dataclass(frozen=True)
class Board:
    user: str
    port: int
    identity: Path   # the private key that logs in

    @property
    def target(self) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}"


def ensure_openssh() -> None:
    if SSHD.exists() and shutil.which("ssh") and shutil.which("scp") and shutil.which("ssh-keygen"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise BackendError("sshd is missing: install Debian's openssh-server and openssh-client "
                           "(`apt-get install openssh-server openssh-client`)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if not list(Path("/var/lib/apt/lists").glob("*_Packages*")):
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
    r = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "openssh-server",
                        "openssh-client"], env=env, capture_output=True, text=True)
    if r.returncode != 0 or not SSHD.exists():
        raise BackendError(f"installing openssh-server failed ({r.returncode}): {r.stderr[-2000:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, proc: subprocess.Popen, log: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BackendError(f"sshd exited ({proc.returncode}): {log.read_text()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.1)
    raise BackendError(f"sshd did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


@contextlib.contextmanager
def loopback_sshd(workdir: Path) -> Iterator[Board]:
    """Start sshd (foreground, its own config and keys under ``workdir``); stop it on exit."""
    ensure_openssh()
    d = Path(workdir)
    d.mkdir(parents=True, exist_ok=True)
    for key in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"edgepeft-{key}", "-f", str(d / key)],
                       check=True, capture_output=True)
    (d / "authorized_keys").write_text((d / "user_key.pub").read_text())
    port = _free_port()
    (d / "sshd_config").write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {d / 'host_key'}", f"PidFile {d / 'sshd.pid'}",
        f"AuthorizedKeysFile {d / 'authorized_keys'}", "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "UsePAM no", "PrintMotd no", "Subsystem sftp internal-sftp",
        # The key files live in a test's temporary folder, whose owner and modes sshd would audit.
        "StrictModes no", "",
    ]))
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation folder
    log = d / "sshd.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(d / "sshd_config")], stdout=subprocess.DEVNULL,
                                stderr=err)
    try:
        _wait_listening(port, proc, log)
        yield Board(getpass.getuser(), port, d / "user_key")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
