"""What the ``cm3 eval`` commands take, as dataclasses whose defaults are the commands' defaults. A module without
torch, so the command line reads them when it starts; ``cm3.evaluation.text_to_image`` and
``cm3.evaluation.image_to_text`` do the work."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from pathlib import Path

from cm3.core.errors import InputError
from cm3.model.sampling_options import CAPTION_TOKENS, METHODS, SamplingConfig

MIX = "mix"  # half top-p, half CD-K per prompt: the paper's best FID recipe
METRICS = ("fid", "fd_clip", "clip_score")
SAMPLE_METHODS = (*METHODS, MIX)
VQA_ANSWER_TOKENS = 8  # VQA answers are a few words
CAPTION_PROMPT = ""  # text after the image when captioning: none (a pretrained model); SFT: its instruction
VQA_TEMPLATE = "{text}"  # text after the image for a VQA question
IMAGE_PATTERN = "{}"  # how a VQA image id becomes a file name


@dataclass(frozen=True)
class Setting:
    """One row of an ablation: how many retrieved documents, the CFG scale, the decoding method."""

    retrieved: int
    guidance: float
    method: str

    @property
    def name(self) -> str:
        return f"k{self.retrieved}-g{self.guidance:g}-{self.method}"


@dataclass
class TextToImageOptions:
    """What ``cm3 eval text-to-image`` takes; the command's defaults are these."""

    checkpoint: Path
    prompts: Path
    out: Path
    references: Path | None = None
    samples: int = 1  # images per prompt
    retrieved: tuple[int, ...] = (0,)
    guidance: tuple[float, ...] = (3.0,)
    methods: tuple[str, ...] = ("top_p",)
    index: Path | None = None
    rerank: bool = False
    clip: dict | None = None  # {"model_name", "pretrained"} of an OpenCLIP model
    inception: Path | None = None
    metrics: tuple[str, ...] | None = None  # default: fid, and fd_clip + clip_score when a CLIP model is given
    limit: int | None = None
    seed: int = 0
    batch_size: int = 32  # images per decoder call (whole prompts: at least `samples`)
    temperature: float = 1.0
    top_p: float = 0.9
    cd_alpha: float = 0.1
    cd_k: int = 5
    device: str = "cpu"
    grid: int = 8  # prompts shown in report.md
    sampling: SamplingConfig = field(init=False)

    def __post_init__(self) -> None:
        if self.metrics is None:
            self.metrics = METRICS if self.clip else ("fid",)
        if unknown := set(self.metrics) - set(METRICS):
            raise InputError(f"--metrics {','.join(sorted(unknown))}: expected some of {', '.join(METRICS)}")
        if unknown := set(self.methods) - set(SAMPLE_METHODS):
            raise InputError(f"--method {','.join(sorted(unknown))}: expected some of {', '.join(SAMPLE_METHODS)}")
        if self.samples < 1 or self.batch_size < 1 or any(k < 0 for k in self.retrieved):
            raise InputError("--samples and --batch-size must be >= 1 and --retrieved >= 0")
        if ({"fd_clip", "clip_score"} & set(self.metrics) or self.rerank) and not self.clip:
            raise InputError("CLIP score, FD-CLIP and --rerank need a CLIP model: give --clip or --clip-model")
        if {"fid", "fd_clip"} & set(self.metrics) and self.references is None:
            raise InputError("FID and FD-CLIP compare with real images: give --references")
        if any(self.retrieved) and self.index is None:
            raise InputError("--retrieved above 0 prepends documents from an index: give --index")
        try:
            self.sampling = SamplingConfig(temperature=self.temperature, top_p=self.top_p, cd_alpha=self.cd_alpha,
                                           cd_k=self.cd_k, seed=self.seed)
        except ValueError as err:
            raise InputError(str(err)) from err

    def settings(self) -> list[Setting]:
        return [Setting(k, g, m) for k, g, m in itertools.product(self.retrieved, self.guidance, self.methods)]

    @property
    def prompts_per_shard(self) -> int:
        return max(1, self.batch_size // self.samples)


@dataclass
class ImageToTextOptions:
    """What ``cm3 eval caption`` and ``cm3 eval vqa`` share; the commands' defaults are these."""

    checkpoint: Path
    images: Path
    out: Path
    batch_size: int = 16
    max_new_tokens: int = CAPTION_TOKENS  # `cm3 eval vqa` asks for VQA_ANSWER_TOKENS
    limit: int | None = None  # that many images (captioning) or questions (VQA), drawn at random with `seed`
    seed: int = 0
    device: str = "cpu"

    def subset(self, items: list) -> list:
        if self.limit is None or self.limit >= len(items):
            return items
        return [items[i] for i in sorted(random.Random(self.seed).sample(range(len(items)), self.limit))]
