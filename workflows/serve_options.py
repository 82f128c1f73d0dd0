"""`cm3 serve`'s options: a module without Ray, FastAPI or torch, so the command line takes its defaults from it
when it starts (`cm3.workflows.serve` runs the server)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServeOptions:
    """Everything `cm3 serve` passes to its replicas (plain values: the options travel to them as a dict)."""

    checkpoint: str
    host: str = "127.0.0.1"
    port: int = 8000
    ray_address: str | None = None
    replicas: int = 1
    cpus_per_replica: int = 1  # CPU replicas: Ray's num_cpus and torch's threads (Ray would give them one thread)
    device: str = "auto"  # auto: a GPU per replica when the cluster has GPUs, else the CPU
    compile: bool | None = None  # None: compile the decode step on CUDA only (it costs minutes of warm-up)
    int8: bool = False
    max_batch_images: int = 16
    batch_wait_ms: float = 20.0
    max_queued_requests: int = 64
    max_body_bytes: int = 4 * 2**20
    index: str | None = None  # a cm3 build-index folder: lets requests ask for retrieved documents
    max_retrieved: int = 4
