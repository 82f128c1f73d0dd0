"""Shared fixtures: the demo-data server on loopback and a real two-node Ray cluster on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cm3.workflows.ray_cluster import free_port  # noqa: F401  (the tests import it from here)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# Ray 2.60 turns token auth on by default; a second node cannot join without this (workflows/ray_cluster.py).
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "NO_ALBUMENTATIONS_UPDATE": "1"}
os.environ.update(RAY_ENV)


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
    from cm3.synthetic.server import DemoDataServer

    server = DemoDataServer(n=400, seed=0, split="train", port=0, slow_seconds=4.0)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster():
    """A head and one worker node; stopped without touching any other Ray cluster on the machine."""
    from cm3.workflows.ray_cluster import LocalRayCluster

    with LocalRayCluster(head_cpus=1, worker_nodes=1, worker_cpus=1) as cluster:
        yield cluster
