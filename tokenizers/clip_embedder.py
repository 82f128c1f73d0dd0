"""The frozen CLIP bi-encoder of retrieval: images, captions and documents to unit vectors.

CM3Leon retrieves with maximum inner-product search over document vectors, where a document's
vector is the normalised mean of its normalised text and image embeddings. Everything here goes
through OpenCLIP's own loading path, so a hub tag (online users) and a local checkpoint file
(this project's small trained models, tests, offline machines) load the same way.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Union

import numpy as np
import open_clip
import torch
from PIL import Image

MODEL_CONFIG_DIR = Path(__file__).with_name("model_configs")
TRAINED_CONFIG_FILE = "clip_config.json"  # written by cm3.tokenizers.clip_training next to its checkpoint

ImageBatch = Union[Sequence[Image.Image], np.ndarray]


def project_model_names() -> list[str]:
    """Names of this project's model configs (e.g. ``cm3-clip-tiny``)."""
    return sorted(path.stem for path in MODEL_CONFIG_DIR.glob("*.json"))


def register_model_configs() -> None:
    """Make this project's configs loadable by name, like OpenCLIP's built-in ones (idempotent)."""
    if not set(project_model_names()) <= set(open_clip.list_models()):
        open_clip.add_model_config(MODEL_CONFIG_DIR)


def check_model_source(model_name: str, pretrained: str | None) -> None:
    """Fail early and plainly on an unknown model name or a checkpoint file that is not there."""
    register_model_configs()
    if ":" not in model_name and model_name not in open_clip.list_models():
        raise ValueError(
            f"unknown CLIP model {model_name!r}; this project's models: {', '.join(project_model_names())}; "
            f"OpenCLIP's: open_clip.list_models() (e.g. ViT-B-32)"
        )
    if pretrained and not open_clip.get_pretrained_cfg(model_name, pretrained) and not Path(pretrained).is_file():
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise FileNotFoundError(
            f"pretrained {pretrained!r} for {model_name!r} is neither an existing checkpoint file nor an "
            f"OpenCLIP tag (known tags: {', '.join(tags) if tags else 'none'})"
        )


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (all-zero rows stay zero)."""
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _as_pil(image: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image arrays must be uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
        return Image.fromarray(image, "RGB")
    return image.convert("RGB")


class ClipEmbedder:
    """A frozen OpenCLIP model that embeds images, texts and image-text documents for MIPS."""

    def __init__(self, model_name: str, pretrained: str | None, device: str = "cpu", batch_size: int = 64):
        check_model_source(model_name, pretrained)
        self.model_name = model_name
        self.pretrained = pretrained
        self.device = torch.device(device)
        self.batch_size = batch_size
        model, _, self.preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, device=self.device
        )
        self.model = model.eval().requires_grad_(False)
        self.tokenizer: Callable[[list[str]], torch.Tensor] = open_clip.get_tokenizer(model_name)
        self.dim: int = self._encode(self.model.encode_text, self.tokenizer([""])).shape[1]

    @classmethod
    def from_trained(cls, folder: str | Path, device: str = "cpu", batch_size: int = 64) -> ClipEmbedder:
        """The model that ``train_clip`` wrote into ``folder`` (its clip_config.json names it)."""
        folder = Path(folder)
        config = json.loads((folder / TRAINED_CONFIG_FILE).read_text(encoding="utf-8"))
        return cls(config["model_name"], str(folder / config["checkpoint"]), device=device, batch_size=batch_size)

    @property
    def identity(self) -> dict[str, str | None]:
        """What produced the vectors; stored with an index and checked again at query time."""
        return {"model_name": self.model_name, "pretrained": self.pretrained}

    def _encode(self, encode: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor) -> np.ndarray:
        with ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            if self.device.type == "cuda":
                stack.enter_context(torch.autocast("cuda", dtype=torch.bfloat16))
            features = encode(inputs.to(self.device))
        return normalise(features.float().cpu().numpy())

    def embed_images(self, images: ImageBatch) -> np.ndarray:
        """float32 [B, dim] unit vectors of PIL images or a uint8 [B, H, W, 3] array."""
        out = [np.zeros((0, self.dim), np.float32)]
        for batch in _batches(images, self.batch_size):
            pixels = torch.stack([self.preprocess(_as_pil(image)) for image in batch])
            out.append(self._encode(self.model.encode_image, pixels))
        return np.concatenate(out)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """float32 [B, dim] unit vectors of captions."""
        out = [np.zeros((0, self.dim), np.float32)]
        for batch in _batches(list(texts), self.batch_size):
            out.append(self._encode(self.model.encode_text, self.tokenizer(list(batch))))
        return np.concatenate(out)

    def embed_documents(
        self, images: Sequence[Image.Image | np.ndarray | None] | np.ndarray, texts: Sequence[str | None]
    ) -> np.ndarray:
        """float32 [B, dim]: normalise(normalise(image) + normalise(text)); a missing modality is left out."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        vectors = np.zeros((len(texts), self.dim), np.float32)
        with_image = [i for i, image in enumerate(images) if image is not None]
        with_text = [i for i, text in enumerate(texts) if text is not None]
        if missing := sorted(set(range(len(texts))) - set(with_image) - set(with_text)):
            raise ValueError(f"documents {missing[:10]} have neither an image nor a text")
        if with_image:
            vectors[with_image] += self.embed_images([images[i] for i in with_image])
        if with_text:
            vectors[with_text] += self.embed_texts([texts[i] for i in with_text])
        return normalise(vectors)
