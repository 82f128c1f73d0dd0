"""Stops the local Ray cluster a cm3 driver started when that driver dies, however it dies (SIGKILL included).

``ray.init`` starts a local cluster's processes as the driver's children; a driver killed with SIGKILL leaves them
running (raylet, GCS, dashboard, workers). So before starting them the driver tags the environment they inherit
with a token of its own, and starts this module as a watchdog in its own session, reading a pipe whose write end
only the driver holds. The pipe closes when the driver exits or is killed; the watchdog then ends every process
whose environment carries the token: that cluster's processes, never another cluster's (no ``ray stop``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

OWNER_VARIABLE = "CM3_RAY_OWNER"
_pipes: list[int] = []  # the write ends this process holds open for as long as it lives


def watch_children() -> str:
    """Start a watchdog for the processes this driver starts from now on with the token in their environment;
    returns the token (``tagged`` finds them)."""
    token = uuid.uuid4().hex
    read_end, write_end = os.pipe()  # not inherited by later children: only this process holds the write end
    env = {k: v for k, v in os.environ.items() if k != OWNER_VARIABLE}
    subprocess.Popen([sys.executable, "-m", "cm3.workflows.ray_watchdog", token], stdin=read_end,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    os.close(read_end)
    _pipes.append(write_end)
    os.environ[OWNER_VARIABLE] = token
    return token


def tagged(token: str) -> list[int]:
    """The live processes whose environment carries ``token`` (zombies, already ended, left out)."""
    marker = f"{OWNER_VARIABLE}={token}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker not in (proc / "environ").read_bytes().split(b"\0"):
                continue
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # ended while being read, or not ours to read
        if state not in ("Z", "X"):
            found.append(int(proc.name))
    return found


def stop_tagged(token: str, grace: float = 5.0) -> None:
    """SIGTERM the tagged processes, then SIGKILL those still running after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        pids = tagged(token)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + wait
        while pids and tagged(token) and time.monotonic() < deadline:
            time.sleep(0.1)


def main() -> None:
    token = sys.argv[1]
    sys.stdin.buffer.read()  # returns at end of file: the driver has ended
    stop_tagged(token)


if __name__ == "__main__":
    main()
