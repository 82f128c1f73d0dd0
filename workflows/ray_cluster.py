"""A Ray cluster on this machine, started with `ray start` and stopped without touching anyone else's.

`ray stop` kills every Ray process on the machine, a user's own clusters included. `LocalRayCluster.stop`
has the effect of `ray stop --force` limited to the processes of the nodes it started: those whose
environment carries its marker, whose command line names its private temp dir, or that keep a file of it
open (Ray's agents rename their command lines, but keep their logs open).

Tests and benchmarks use it for a real multi-process cluster on loopback (a head plus worker nodes).
On Ray 2.60 a node joins a head only when ``RAY_AUTH_MODE=disabled`` is set for every process.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOOPBACK = "127.0.0.1"
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
MARKER_VARIABLE = "CM3_LOCAL_RAY_CLUSTER"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


class LocalRayCluster:
    """`ray start --head` plus ``worker_nodes`` more `ray start --address` nodes, all on 127.0.0.1."""

    def __init__(self, head_cpus: int = 1, worker_nodes: int = 0, worker_cpus: int = 1,
                 temp_root: str | os.PathLike | None = None, dashboard: bool = False):
        self.head_cpus, self.worker_nodes, self.worker_cpus = head_cpus, worker_nodes, worker_cpus
        self.port = free_port()
        self.address = f"{LOOPBACK}:{self.port}"
        # short: Ray's unix socket paths live under it and must stay below ~107 characters
        self.temp_dir = tempfile.mkdtemp(prefix="cm3ray", dir=temp_root or "/tmp")
        self.marker = f"{os.getpid()}-{self.port}"
        self.env = {**os.environ, **RAY_ENV, MARKER_VARIABLE: self.marker}
        self.dashboard = dashboard
        self.start_seconds = 0.0

    def start(self) -> LocalRayCluster:
        started = time.time()
        common = [f"--node-ip-address={LOOPBACK}", "--disable-usage-stats"]
        try:
            self._ray(["start", "--head", f"--port={self.port}", f"--num-cpus={self.head_cpus}",
                       f"--include-dashboard={str(self.dashboard).lower()}", f"--temp-dir={self.temp_dir}", *common])
            for _ in range(self.worker_nodes):
                self._ray(["start", f"--address={self.address}", f"--num-cpus={self.worker_cpus}", *common])
            self._wait_for_nodes(1 + self.worker_nodes)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.time() - started
        return self

    def __enter__(self) -> LocalRayCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _ray(self, args: list[str]) -> None:
        ray = Path(sys.executable).parent / "ray"
        proc = subprocess.run([str(ray), *args], capture_output=True, text=True, env=self.env, timeout=180)
        if proc.returncode != 0:
            raise RuntimeError(f"ray {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")

    def _wait_for_nodes(self, count: int, timeout: float = 90) -> None:
        """Block until `count` nodes are alive; `ray start` returns before a joining node registers."""
        code = ("import ray, time\n"
                f"ray.init(address={self.address!r}, _node_ip_address={LOOPBACK!r}, logging_level='ERROR')\n"
                f"deadline = time.time() + {timeout}\n"
                f"while sum(n['Alive'] for n in ray.nodes()) < {count} and time.time() < deadline:\n"
                "    time.sleep(0.5)\n"
                "print(sum(n['Alive'] for n in ray.nodes()))\n")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=self.env,
                              timeout=timeout + 60)
        alive = proc.stdout.strip().splitlines()[-1:]
        if alive != [str(count)]:
            raise RuntimeError(f"the Ray cluster at {self.address} did not reach {count} nodes "
                               f"(alive: {alive}):\n{proc.stderr[-2000:]}")

    def pids(self) -> list[int]:
        """This cluster's processes (never the calling process)."""
        found = []
        marker = f"{MARKER_VARIABLE}={self.marker}".encode()
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                environ = (proc / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if self.temp_dir in cmdline or marker in environ or self._has_file_open(proc):
                found.append(int(proc.name))
        return found

    def _has_file_open(self, proc: Path) -> bool:
        try:
            fds = list((proc / "fd").iterdir())
        except OSError:
            return False
        for fd in fds:
            try:
                if os.readlink(fd).startswith(self.temp_dir + "/"):
                    return True
            except OSError:
                continue
        return False

    def stop(self) -> None:
        """SIGTERM this cluster's processes, then SIGKILL what is left; remove its temp dir."""
        for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 2.0)):
            pids = self.pids()
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + wait
            while pids and time.time() < deadline:
                pids = [p for p in pids if not _gone(p)]
                if pids:
                    time.sleep(0.1)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _gone(pid: int) -> bool:
    """Exited, or a zombie waiting for its parent."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return True
