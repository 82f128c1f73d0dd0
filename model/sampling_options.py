"""How generation picks each next token (``SamplingConfig``) and the captioning defaults.

A module without torch: ``cm3 generate`` and ``cm3 caption`` take their defaults from it when the command line
starts, and ``cm3.model.generation`` reads the same objects.
"""

from __future__ import annotations

from dataclasses import dataclass

METHODS = ("top_p", "cd_k", "greedy")
CAPTION_METHOD = "greedy"  # captions and VQA answers: the most likely words unless a caller asks otherwise
CAPTION_TOKENS = 32  # the longest caption or answer


@dataclass
class SamplingConfig:
    """How to pick each next token. `guidance_scale` is CFG's alpha_c (1.0: no guidance); `cd_alpha`/`cd_k` are
    CD-K's plausibility cut-off (not published; 0.1 is CD's usual alpha, k is our choice)."""

    temperature: float = 1.0
    top_p: float = 0.9
    guidance_scale: float = 3.0
    # Chameleon's inference guides text and image conditions apart (defaults there: text 3.0, image 1.2); None
    # keeps the paper's two-stream CFG.
    image_guidance_scale: float | None = None
    method: str = "top_p"
    cd_alpha: float = 0.1
    cd_k: int = 5
    seed: int | None = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.cd_alpha <= 1:
            raise ValueError(f"cd_alpha must be in [0, 1], got {self.cd_alpha}")
        if self.cd_k < 1:
            raise ValueError(f"cd_k must be >= 1, got {self.cd_k}")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")
