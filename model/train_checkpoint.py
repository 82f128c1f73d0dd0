"""Training checkpoints: full weights (safetensors), optimizer state (tensors only) and the train state.

    CKPT/model.safetensors + config.json   (a `CM3.from_pretrained` folder)
    CKPT/optimizer.pt                      (loaded with `weights_only=True`: nothing is unpickled)
    CKPT/train_state.json                  (written last: a folder without it is incomplete)

Weights and optimizer state are gathered whole, whatever the parallelism (`gather_state`: every rank takes part
under FSDP), so a run may resume with another parallelism; the data positions resume exactly only with the
same number of workers.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from cm3.core.errors import InputError
from cm3.core.files import atomic_write
from cm3.core.intact import load_json
from cm3.model.config import CM3Config
from cm3.model.decoder import CM3, check_weights

STATE_FILE = "train_state.json"
OPTIMIZER_FILE = "optimizer.pt"
CHECKPOINT_PREFIX = "checkpoint_"


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:07d}"


@dataclass
class TrainState:
    """Everything besides weights and optimizer moments that a resumed run needs to continue identically."""

    step: int
    tokens_seen: int
    positions: list[dict]  # one DataPosition per worker rank
    seed: int
    config: dict

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def read(cls, directory: Path) -> TrainState:
        return cls(**json.loads((Path(directory) / STATE_FILE).read_text()))


def gather_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(weights, optimizer state), full and on the CPU on rank 0 (empty elsewhere). Every rank must call it:
    under FSDP it all-gathers the shards. Keys are the plain module's, whatever wraps the blocks."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def restore_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, fsdp: bool) -> None:
    """Load a `gather_state` optimizer state into this run's optimizer (sharding it under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=fsdp))


def save_train_checkpoint(directory: Path, model_state: dict[str, torch.Tensor], optimizer_state: dict,
                          config: CM3Config, state: TrainState) -> None:
    """Weights as safetensors + config.json, optimizer state as tensors, then train_state.json last."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = CM3(config)
    model.load_state_dict(model_state, assign=True)
    model.save_pretrained(directory)
    torch.save(optimizer_state, directory / OPTIMIZER_FILE)
    atomic_write(directory / STATE_FILE, state.to_json())


def load_train_checkpoint(directory: Path) -> tuple[CM3, dict, TrainState]:
    """(model on CPU, optimizer state dict, train state); nothing is unpickled (`weights_only=True`)."""
    directory = Path(directory)
    if not (directory / STATE_FILE).is_file():
        raise FileNotFoundError(f"{directory}: not a complete training checkpoint ({STATE_FILE} is missing)")
    model = CM3.from_pretrained(directory)
    optimizer_state = torch.load(directory / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    return model, optimizer_state, TrainState.read(directory)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete training checkpoint in a run folder (names carry the zero-padded step); a newer one
    that a killed run left half-copied is passed over."""
    written = sorted(p.parent for p in Path(run_dir).glob(f"{CHECKPOINT_PREFIX}*/{STATE_FILE}"))
    return next((folder for folder in reversed(written) if is_complete(folder)), None)


def is_complete(directory: Path) -> bool:
    """Every file of the checkpoint is whole: the train state and config parse, the weights' headers cover their
    files exactly, the optimizer state's zip directory (at its end) is there. Cheap: no tensor is read."""
    directory = Path(directory)
    try:
        TrainState(**load_json(directory / STATE_FILE))
        load_json(directory / "config.json")
        check_weights(directory)
        with zipfile.ZipFile(directory / OPTIMIZER_FILE):
            pass
    except (InputError, OSError, TypeError, zipfile.BadZipFile):
        return False
    return True


def checkpoint_step(directory: Path) -> int:
    """The step in a checkpoint folder's name (-1 for a name not made by ``checkpoint_name``)."""
    suffix = Path(directory).name.removeprefix(CHECKPOINT_PREFIX)
    return int(suffix) if suffix.isdigit() else -1


def resume_from(registered: Path | None, run_dir: Path) -> Path | None:
    """The checkpoint to resume from: the newest complete one on disk when it is newer than the one the
    orchestrator registered (Ray's record of its checkpoints is written later than the checkpoints themselves,
    so after a driver is killed it can lag several checkpoints behind what is on disk)."""
    on_disk = latest_checkpoint(run_dir)
    if on_disk is not None and (registered is None or checkpoint_step(on_disk) > checkpoint_step(registered)):
        return on_disk
    return registered
