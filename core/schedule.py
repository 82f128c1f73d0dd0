"""The training schedule the decoder, the VQ-GAN and the CLIP trainers share: a learning rate that warms up then
decays, and a budget of "N steps or S seconds, whichever ends first" that the decay can run over."""

from __future__ import annotations

import math
import time


def warmup(position: float, length: float, offset: float = 1.0) -> float:
    """Linear warm-up factor ``(position + offset) / length``, at most 1 (offset 1: the first step already learns)."""
    return min(1.0, (position + offset) / length)


def decay(progress: float, shape: str = "cosine", floor: float = 0.0) -> float:
    """Factor from 1 at ``progress`` 0 down to ``floor`` at 1 (and after): ``"cosine"`` or ``"linear"``."""
    progress = min(1.0, progress)
    if shape == "linear":
        return 1.0 - (1.0 - floor) * progress
    if shape == "cosine":
        return floor + (1.0 - floor) * (0.5 * (1 + math.cos(math.pi * progress)))
    raise ValueError(f"decay shape must be cosine or linear, got {shape!r}")


def warmup_then_decay(position: float, total: float, warmup_length: float, shape: str, floor: float = 0.0,
                      offset: float = 1.0) -> float:
    """Learning-rate factor at ``position`` of ``total`` (steps, or a fraction of a budget): linear warm-up over the
    first ``warmup_length``, then ``decay`` over the rest, reaching ``floor`` at ``total``."""
    if position < warmup_length:
        return warmup(position, warmup_length, offset)
    rest = total - warmup_length
    return decay((position - warmup_length) / (rest if rest > 0 else 1), shape, floor)


class StepBudget:
    """Train until ``steps`` steps or ``seconds`` of training wall clock, whichever ends first.

    ``progress(step)`` runs from 0 to 1 along the nearer limit, so a schedule over it ends at its floor when the
    time runs out as well as at the last step; ``elapsed_before`` carries the clock of a resumed run.
    """

    def __init__(self, steps: int, seconds: float | None = None, elapsed_before: float = 0.0):
        self.steps, self.seconds, self.elapsed_before = steps, seconds, elapsed_before
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def progress(self, step: int) -> float:
        return max(step / self.steps, self.elapsed() / self.seconds if self.seconds else 0.0)
