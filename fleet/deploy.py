"""A fleet deployed as separate processes on the loopback interface: one Flower SuperLink and
N SuperNodes (``--insecure``), each SuperNode a device with its own folder, user, backend and
memory budget, and the run submitted with ``flwr run`` to that SuperLink. Nothing needs the
network: the SuperLink runs with ``--disable-runtime-dependency-installation`` (no per-run
environment), ``FLWR_HOME`` points at a config naming this SuperLink, and the app is a
pyproject.toml whose components are ``edgepeft.fleet.apps`` (already installed).

Flower 1.42 notes: the SuperLink serves its Fleet, Control and runtime APIs over one HTTP port
(``--port``); SuperNodes and ``flwr run`` talk to it there. The SuperLink and SuperNodes start
``flower-superexec`` / ``flwr-serverapp`` / ``flwr-clientapp`` by name, so the venv's bin must
be on PATH; each SuperNode starts a ``flwr-clientapp`` process per message. Each process here
starts in its own session, so stopping or killing one SuperNode takes its children with it."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping

from edgepeft.fleet.errors import FleetError

APP_TOML = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "edgepeft-fleet"
version = "1.0.0"
description = "edgepeft fleet learning"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "edgepeft"

[tool.flwr.app.components]
serverapp = "edgepeft.fleet.apps:server_app"
clientapp = "edgepeft.fleet.apps:client_app"

[tool.flwr.app.config]
bundle = ""
out = ""
rounds = 2
clients = 2
local-steps = 5
key = ""
trusted-key = ""
timeout = 120.0
lr = 0.003
batch-size = 8
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toml(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


class LocalFederation:
    """Start, drive and stop a SuperLink and its SuperNodes (by their process ids)."""

    def __init__(self, work: str | Path, *, port: int | None = None):
        self.work = Path(work)
        self.port = port or free_port()
        self.bin = Path(sys.executable).parent
        self.link: subprocess.Popen | None = None
        self.nodes: dict[int, subprocess.Popen] = {}
        self.work.mkdir(parents=True, exist_ok=True)
        home = self.work / "flwr-home"
        home.mkdir(exist_ok=True)
        (home / "config.toml").write_text(f'[superlink]\ndefault = "fleet"\n\n[superlink.fleet]\n'
                                          f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
        (self.work / "app").mkdir(exist_ok=True)
        (self.work / "app" / "pyproject.toml").write_text(APP_TOML)
        self.env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
                    "PYTHONWARNINGS": "ignore"}

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.work / f"{name}.log", "wb")
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.work,
                                start_new_session=True)

    def start_link(self, wait: float = 60.0) -> None:
        self.link = self._spawn("superlink", [str(self.bin / "flower-superlink"), "--insecure",
                                              "--disable-runtime-dependency-installation", "--port", str(self.port),
                                              "--database", ":flwr-in-memory:"])
        deadline = time.time() + wait
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if self.link.poll() is not None:
                break
            time.sleep(0.5)
        raise FleetError(f"the SuperLink did not come up on port {self.port}: see {self.work / 'superlink.log'}")

    def start_node(self, i: int, *, root: str | Path, user: str, memory_budget: str | None = None,
                   backend: str = "portable") -> None:
        cfg = {"root": str(root), "user": user, "backend": backend, "memory-budget": memory_budget or ""}
        self.nodes[i] = self._spawn(f"supernode-{i}", [
            str(self.bin / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.port}",
            "--port", str(free_port()), "--node-config", " ".join(f"{k}={_toml(v)}" for k, v in cfg.items())])

    def node_log(self, i: int) -> str:
        return (self.work / f"supernode-{i}.log").read_text(errors="replace")

    def run(self, config: Mapping[str, object]) -> subprocess.Popen:
        """Submit the fleet run (``flwr run``, logs streamed to run.log); returns its process."""
        overrides = " ".join(f"{k}={_toml(v)}" for k, v in config.items())
        return self._spawn("run", [str(self.bin / "flwr"), "run", str(self.work / "app"), "fleet", "--stream",
                                   "--run-config", overrides])

    def kill_node(self, i: int) -> None:
        """SIGKILL a SuperNode and the processes it started (a device that dies mid-round)."""
        p = self.nodes[i]
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)

    def stop(self) -> None:
        for p in [*self.nodes.values(), *([self.link] if self.link else [])]:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                    p.wait(timeout=20)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(timeout=20)

    def __enter__(self) -> "LocalFederation":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
