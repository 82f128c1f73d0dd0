"""Shared fixtures: the demo-data server on loopback and a real two-node Ray cluster on loopback."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Ray 2.60 turns token auth on by default; a second node cannot join without this (DEVELOPERS.md).
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "NO_ALBUMENTATIONS_UPDATE": "1"}
os.environ.update(RAY_ENV)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cm3(*args: str, timeout: float = 300, check: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """Run the installed `cm3` console script as a user would."""
    proc = subprocess.run(
        [str(BIN / "cm3"), *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **RAY_ENV}, **kwargs,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"cm3 {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def torch_one_thread():
    """Tiny models on a shared 2-core machine: extra OpenMP threads only spin and make them several times slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def demo_server():
    from cm3.workflows.demo.server import DemoDataServer

    server = DemoDataServer(n=400, seed=0, split="train", port=0, slow_seconds=4.0)
    server.start()
    yield server
    server.stop()


class RayCluster:
    """`ray start --head` plus one more `ray start --address` node, both on 127.0.0.1, in a temp dir."""

    def __init__(self, tmp: Path, head_cpus: int = 1, worker_cpus: int = 1):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.temp_dir = tmp / "ray"
        self.env = {**os.environ, **RAY_ENV}
        common = ["--node-ip-address=127.0.0.1", "--disable-usage-stats"]
        self._ray(["start", "--head", f"--port={self.port}", f"--num-cpus={head_cpus}",
                   "--include-dashboard=false", f"--temp-dir={self.temp_dir}", *common])
        self._ray(["start", f"--address={self.address}", f"--num-cpus={worker_cpus}", *common])
        self._wait_for_nodes(2)

    def _ray(self, args: list[str]) -> None:
        proc = subprocess.run([str(BIN / "ray"), *args], capture_output=True, text=True, env=self.env, timeout=180)
        if proc.returncode != 0:
            raise RuntimeError(f"ray {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")

    def _wait_for_nodes(self, count: int, timeout: float = 90) -> None:
        code = ("import ray; ray.init(address=%r, _node_ip_address='127.0.0.1', logging_level='ERROR');"
                "print(sum(n['Alive'] for n in ray.nodes()))" % self.address)
        deadline = time.time() + timeout
        while time.time() < deadline:
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=self.env)
            if proc.stdout.strip().splitlines()[-1:] == [str(count)]:
                return
            time.sleep(2)
        raise RuntimeError(f"the Ray cluster at {self.address} did not reach {count} nodes")

    def stop(self) -> None:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], capture_output=True, env=self.env, timeout=120)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    cluster = RayCluster(tmp_path_factory.mktemp("cluster"))
    yield cluster
    cluster.stop()
