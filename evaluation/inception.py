"""The FID network: torch-fidelity's port of the TensorFlow Inception v3 that FID is defined with
(``inception-2015-12-05``; its outputs match the TensorFlow reference to machine precision), from a local file.

Nothing is downloaded. The weights come from ``--inception PATH`` or from where torch-fidelity and torchmetrics keep
them once they have downloaded them (``default_weights_path``). The file is read with ``torch.load(weights_only=True)``
(or as safetensors), so it cannot run code; torch-fidelity's own loader unpickles without that guard, so it is handed
tensors that were checked that way, never the user's file.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

from cm3.core.errors import InputError

WEIGHTS_FILE = URL_INCEPTION_V3.rsplit("/", 1)[1]  # weights-inception-2015-12-05-6726825d.pth
FEATURE = "2048"  # the pool features FID is computed on


def default_weights_path() -> Path:
    """Where torch-fidelity (and torchmetrics, through it) caches the weights: ``$TORCH_HOME/hub/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE


def resolve_weights(path: Path | None) -> Path:
    """The weights file to load: ``path``, else the cache; a missing file is an InputError saying where to put it."""
    where = Path(path) if path is not None else default_weights_path()
    if where.is_file():
        return where
    origin = "--inception" if path is not None else "the torch-fidelity cache"
    raise InputError(f"FID needs the FID Inception weights, and {where} ({origin}) is not there. Download "
                     f"{URL_INCEPTION_V3} on a machine with internet and put it at {default_weights_path()} or pass "
                     f"--inception PATH (nothing is downloaded at run time)")


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or torch (``.pth``) file, read without running any code it may hold."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any reading failure is the file's fault; say which file
        raise InputError(f"{path}: cannot be read as weights (a state dict of tensors): {err}") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return state


def load_inception(path: Path | None = None, device: str | torch.device = "cpu") -> FeatureExtractorInceptionV3:
    """torch-fidelity's FID Inception (2048 pool features) with the weights of ``resolve_weights(path)``."""
    weights = resolve_weights(path)
    buffer = io.BytesIO()
    torch.save(load_state_dict(weights), buffer)  # tensors only: what torch-fidelity unpickles is ours
    buffer.seek(0)
    try:
        network = FeatureExtractorInceptionV3("inception-v3-compat", [FEATURE], feature_extractor_weights_path=buffer)
    except RuntimeError as err:
        raise InputError(f"{weights}: not the FID Inception's weights (layer names or shapes differ): "
                         f"{str(err)[:300]}") from err
    return network.to(device)


@torch.no_grad()
def inception_features(network: FeatureExtractorInceptionV3, batches: Iterable[torch.Tensor]) -> torch.Tensor:
    """float64 [N, 2048] pool features of uint8 image batches [B, 3, H, W] (any size: the network resizes to 299
    as the TensorFlow graph does)."""
    device = next(network.parameters()).device
    features = [torch.zeros(0, int(FEATURE), dtype=torch.float64)]
    for batch in batches:
        features.append(network(batch.to(device))[0].double().cpu())
    return torch.cat(features)
