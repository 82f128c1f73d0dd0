"""Connecting to Ray: an existing cluster (``--ray-address``) or a local one with the dashboard on."""

from __future__ import annotations

import os
from urllib.parse import urlparse

import ray

LOOPBACK = "127.0.0.1"


def _is_loopback(address: str) -> bool:
    host = urlparse(address if "://" in address else f"ray://{address}").hostname or ""
    return host in ("127.0.0.1", "localhost", "::1")


def connect(address: str | None = None, num_cpus: int | None = None, quiet: bool = False,
            dashboard: bool = True) -> str | None:
    """Start or join Ray; returns the dashboard URL (printed unless ``quiet``).

    ``address=None`` starts a local cluster bound to loopback, with the dashboard on unless ``dashboard`` is False,
    and stopped by a watchdog (``ray_watchdog``) if this process dies without stopping it;
    ``"auto"`` joins the cluster started on this machine by ``ray start``; ``host:port`` joins that head.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return None
    kwargs: dict = {"log_to_driver": True, "configure_logging": False}
    if address is None:
        # Ray starts workers at nice 15; here the workers *are* the job (downloads, encoders), so they
        # must not yield the CPU to everything else on the machine. (`ray start` users: set it there.)
        os.environ.setdefault("RAY_worker_niceness", "0")
        kwargs.update(
            address="local",  # always a new cluster, never one that `ray start` left on this machine
            include_dashboard=dashboard,
            dashboard_host=LOOPBACK,
            _node_ip_address=LOOPBACK,
            num_cpus=num_cpus,
        )
    else:
        kwargs["address"] = address
        if address == "auto" or _is_loopback(address):
            kwargs["_node_ip_address"] = LOOPBACK
    if address is None:  # a cluster this process owns: a watchdog stops it if this process is killed
        from cm3.workflows.ray_watchdog import OWNER_VARIABLE, watch_children

        watch_children()
        try:
            context = ray.init(**kwargs)
        finally:  # the cluster's processes carry the tag; what this process starts later does not
            os.environ.pop(OWNER_VARIABLE, None)
    else:
        context = ray.init(**kwargs)
    url = context.dashboard_url
    if url and not url.startswith("http"):
        url = f"http://{url}"
    if not quiet:
        where = "local Ray cluster" if address is None else f"Ray cluster at {address}"
        print(f"Connected to the {where}; dashboard: {url or 'not running'}", flush=True)
    return url
