"""Training accounting and where its figures go: FLOPs and MFU, memory, the attention kernel, profiler traces,
a JSONL file in the run folder, the Ray dashboard, and a loss-curve PNG.

The JSONL file is the record a resumed run continues: on resume, lines past the checkpoint step (steps that
were trained but lost with the killed process) are dropped, so each step appears once and the curve is whole.
"""

from __future__ import annotations

import contextlib
import json
import resource
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from cm3.core.files import atomic_write
from cm3.model.config import CM3Config, num_parameters

METRICS_FILE = "metrics.jsonl"
PROFILE_DIR = "profile"
DASHBOARD_METRICS = ("loss", "text_loss", "image_loss", "tokens_per_s", "lr", "grad_norm", "mfu", "data_wait",
                     "memory_gib")

# Dense bf16 tensor-core peak FLOP/s by device-name substring (no sparsity), for MFU.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "B200": 2250e12, "A100": 312e12, "L40S": 362e12,
                   "A10G": 125e12, "L4": 121e12}
# Attention FLOPs per token per layer, in units of T * d: 12 (PaLM, torchtitan: QK^T and AV, forward and
# backward); cm3 counted 6 before, which `benchmarks/train.py` still prints beside it while users switch.
ATTENTION_FLOPS = 12
LEGACY_ATTENTION_FLOPS = 6


# Accounting


def flops_per_token(config: CM3Config, seq_len: int, attention: int = ATTENTION_FLOPS) -> float:
    """Training FLOPs per token: 6 N over the matmul parameters (blocks and the output head) plus the attention
    scores, `attention` x L x T x d (PaLM appendix B; torchtitan's `get_num_flop_per_token`)."""
    n = num_parameters(config, include_embeddings=False) + config.vocab_size * config.d_model
    return 6 * n + attention * config.n_layers * seq_len * config.d_model


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of one device, from `PEAK_BF16_FLOPS`; None on CPU or an unknown card."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def peak_memory_gib(device: torch.device) -> float:
    """The most memory this process has held: the GPU's allocated peak, or on the CPU the peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def attention_backend(config: CM3Config, device: torch.device, dtype: torch.dtype) -> str:
    """The kernel `scaled_dot_product_attention` picks for this model's causal training attention on `device`
    in `dtype`: flash, efficient, cudnn or math (math on a GPU means a slow run: say so before it starts).
    Asked of `torch._fused_sdp_choice`, the function SDPA itself calls to choose; "unknown" if torch lacks it."""
    from torch.nn.attention import SDPBackend

    choose = getattr(torch, "_fused_sdp_choice", None)
    if choose is None:
        return "unknown"
    q = torch.zeros(1, config.n_heads, 64, config.head_dim, device=device, dtype=dtype)
    return SDPBackend(choose(q, q, q, is_causal=True)).name.split("_")[0].lower()  # FLASH_ATTENTION -> flash


@contextlib.contextmanager
def profiler(directory: Path, rank: int, steps: int, device: torch.device) -> Iterator[Callable[[], None]]:
    """A step callback for the loop. With `steps` > 0, the torch profiler skips one step (warm-up, compiling),
    records one more without keeping it, then traces `steps` steps into DIRECTORY/rank{rank}.json (Chrome
    trace format: chrome://tracing, Perfetto)."""
    if steps <= 0:
        yield lambda: None
        return
    from torch.profiler import ProfilerActivity, profile, schedule

    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"rank{rank}.json"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=steps, repeat=1),
                 on_trace_ready=lambda p: p.export_chrome_trace(str(path))) as prof:
        yield prof.step


class MetricsLog:
    """Append-only JSONL, one object per step, flushed every line (a SIGKILL loses at most the last one)."""

    def __init__(self, path: Path, resume_after_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_after_step is not None:
            self._truncate(resume_after_step)
        elif self.path.exists():
            self.path.unlink()  # a fresh run (no checkpoint) starts a fresh record
        self._file = self.path.open("a")

    def _truncate(self, step: int) -> None:
        kept = [line for line in read_metrics(self.path) if line["step"] <= step]
        atomic_write(self.path, "".join(json.dumps(line) + "\n" for line in kept))

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics file (a torn last line from a killed writer is skipped)."""
    if not Path(path).exists():
        return []
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class DashboardGauges:
    """`ray.util.metrics` gauges (cm3_train_loss, cm3_train_tokens_per_s, ...) tagged with the run name."""

    def __init__(self, run: str):
        from ray.util.metrics import Gauge

        self.tags = {"run": run}
        self.gauges = {name: Gauge(f"cm3_train_{name}", description=f"cm3 training {name}", tag_keys=("run",))
                       for name in DASHBOARD_METRICS}

    def set(self, record: dict) -> None:
        for name, gauge in self.gauges.items():
            if record.get(name) is not None:
                gauge.set(float(record[name]), tags=self.tags)


def plot_loss_curve(records: list[dict], path: Path, size: tuple[int, int] = (800, 480)) -> Path:
    """Loss (and text/image loss) against step as a PNG, drawn with PIL so no plotting library is needed."""
    series = {"loss": (20, 20, 20), "text_loss": (30, 110, 220), "image_loss": (220, 90, 30)}
    width, height = size
    left, right, top, bottom = 60, 20, 30, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    points = {name: [(r["step"], r[name]) for r in records if r.get(name) is not None] for name in series}
    values = [v for pts in points.values() for _, v in pts]
    steps = [s for pts in points.values() for s, _ in pts]
    draw.rectangle([left, top, width - right, height - bottom], outline=(160, 160, 160))
    if values:
        s0, s1 = min(steps), max(max(steps), min(steps) + 1)
        v0, v1 = min(values), max(max(values), min(values) + 1e-6)

        def xy(step: float, value: float) -> tuple[float, float]:
            return (left + (step - s0) / (s1 - s0) * (width - left - right),
                    height - bottom - (value - v0) / (v1 - v0) * (height - top - bottom))

        for name, colour in series.items():
            if len(points[name]) > 1:
                draw.line([xy(s, v) for s, v in points[name]], fill=colour, width=2)
        draw.text((4, top), f"{v1:.3f}", fill="black")
        draw.text((4, height - bottom - 10), f"{v0:.3f}", fill="black")
        draw.text((left, height - bottom + 6), f"step {s0}", fill="black")
        draw.text((width - right - 70, height - bottom + 6), f"step {s1}", fill="black")
    for i, (name, colour) in enumerate(series.items()):
        draw.text((left + 10 + 110 * i, 8), name, fill=colour)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
