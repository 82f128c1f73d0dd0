"""`cm3 clip train`: a small OpenCLIP model trained from scratch on raw shards.

The paper retrieves with a frozen pretrained CLIP; machines without internet (the demo, tests,
CI) cannot download one, so this trains a tiny one on the ingested pairs and writes a checkpoint
that ``open_clip.create_model_and_transforms(model_name, pretrained=<file>)`` loads like any other.
"""

from __future__ import annotations

import io
import math
import random
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import open_clip
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from open_clip.loss import ClipLoss
from PIL import Image
from safetensors.torch import save_file
from tqdm import tqdm

from cm3.core.files import atomic_write, write_json
from cm3.core.schedule import StepBudget, warmup_then_decay
from cm3.core.shards import complete_shards, parquet_path
from cm3.tokenizers.clip_embedder import TRAINED_CONFIG_FILE, check_model_source, normalise
from cm3.tokenizers.training_options import ClipTrainOptions

CHECKPOINT_FILE = "open_clip_model.safetensors"
MAX_LOGIT_SCALE = math.log(100)  # OpenCLIP's clamp on the learned temperature


def load_pairs(data: Path) -> tuple[list[str], list[bytes]]:
    """(captions, JPEG bytes) of the successful rows of every complete raw shard in ``data``."""
    captions: list[str] = []
    jpegs: list[bytes] = []
    for shard_id in complete_shards(data):
        table = pq.read_table(parquet_path(data, shard_id), columns=["caption", "jpg", "status"])
        ok = pc.and_(pc.equal(table["status"], "success"), pc.is_valid(table["jpg"]))
        ok = pc.and_(ok, pc.is_valid(table["caption"]))
        table = table.filter(ok)
        captions += table["caption"].to_pylist()
        jpegs += table["jpg"].to_pylist()
    if len(captions) < 2:
        raise ValueError(f"{data}: {len(captions)} usable image-caption pairs in complete shards; need at least 2")
    return captions, jpegs


def _pixels(jpegs: list[bytes], preprocess) -> torch.Tensor:
    return torch.stack([preprocess(Image.open(io.BytesIO(jpeg)).convert("RGB")) for jpeg in jpegs])


def _embed(model, tokenizer, preprocess, captions, jpegs, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit image and text vectors of pairs, in eval mode and without gradients."""
    images, texts = [], []
    with torch.no_grad():
        for start in range(0, len(captions), batch_size):
            images.append(model.encode_image(_pixels(jpegs[start:start + batch_size], preprocess)).numpy())
            texts.append(model.encode_text(tokenizer(captions[start:start + batch_size])).numpy())
    return normalise(np.concatenate(images)), normalise(np.concatenate(texts))


def recall_at(similarity: np.ndarray, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Share of queries (rows) whose own item (the diagonal) ranks within the top k."""
    own = np.diag(similarity)[:, None]
    rank = (similarity > own).sum(axis=1)
    return {f"r@{k}": float((rank < k).mean()) for k in ks}


def evaluate(model, tokenizer, preprocess, captions, jpegs, batch_size: int) -> dict[str, float]:
    """Held-out contrastive loss (batch by batch, as in training) and retrieval recall."""
    model.eval()
    images, texts = _embed(model, tokenizer, preprocess, captions, jpegs, batch_size)
    scale = float(model.logit_scale.detach().exp())
    losses = []
    for start in range(0, len(captions), batch_size):
        img, txt = (torch.from_numpy(v[start:start + batch_size]) for v in (images, texts))
        if len(img) > 1:
            losses.append(float(ClipLoss()(img, txt, scale)))
    similarity = texts @ images.T
    report = {"loss": float(np.mean(losses))}
    report |= {f"text_to_image_{k}": v for k, v in recall_at(similarity).items()}
    report |= {f"image_to_text_{k}": v for k, v in recall_at(similarity.T).items()}
    return report


def one_word_neighbours(captions: list[str]) -> list[np.ndarray]:
    """For each caption, the indices of the captions that differ from it in exactly one word.

    These are the hard negatives of contrastive training ("a small red circle ..." vs "a small red
    square ..."): a random batch rarely holds two of them, so the model could ignore any attribute
    that a random pair seldom differs in alone (on the demo data, the shape).
    """
    groups: dict[tuple, list[int]] = defaultdict(list)
    words = [caption.split() for caption in captions]
    for i, caption_words in enumerate(words):
        for j in range(len(caption_words)):
            groups[(j, tuple(caption_words[:j]), tuple(caption_words[j + 1:]))].append(i)
    neighbours: list[set[int]] = [set() for _ in captions]
    for members in groups.values():
        if len(members) > 1:
            for i in members:
                neighbours[i].update(m for m in members if words[m] != words[i])
    return [np.fromiter(sorted(n), np.int64, len(n)) for n in neighbours]


def _hard_negative_batch(queue: np.ndarray, neighbours: list[np.ndarray], batch_size: int, fraction: float,
                         rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(batch, rest of queue): anchors from the queue, each with a one-word-different partner, topped up."""
    n_anchors = max(1, round(batch_size * (1 - fraction / 2)))
    anchors, queue = queue[:n_anchors], queue[n_anchors:]
    partners = [neighbours[i][rng.integers(len(neighbours[i]))] for i in anchors[: batch_size - n_anchors]
                if len(neighbours[i])]
    batch = list(dict.fromkeys([*anchors.tolist(), *partners]))
    while len(batch) < batch_size and len(queue):
        if (i := int(queue[0])) not in batch:
            batch.append(i)
        queue = queue[1:]
    return np.array(batch, np.int64), queue


def train_clip(
    data: str | Path,
    out_dir: str | Path,
    options: ClipTrainOptions = ClipTrainOptions(),
    *,
    seconds_budget: float | None = None,
    progress: bool = True,
) -> dict:
    """Train ``options.model_name`` from random init with OpenCLIP's contrastive loss; return the report.

    The cosine schedule runs over ``options.steps`` or ``seconds_budget``, whichever ends first, so a time
    budget still ends at a low learning rate. Writes ``out_dir/open_clip_model.safetensors`` and
    ``out_dir/clip_config.json`` (model name, checkpoint file name, report).
    """
    previous_threads = torch.get_num_threads()
    if options.torch_threads:
        torch.set_num_threads(options.torch_threads)
    try:
        return _train(Path(data), Path(out_dir), options.model_name, options.steps, options.batch_size, options.lr,
                      options.weight_decay, options.warmup, options.hard_negatives, options.holdout_fraction,
                      seconds_budget, options.seed, progress)
    finally:
        torch.set_num_threads(previous_threads)


def _train(data: Path, out_dir: Path, model_name: str, steps: int, batch_size: int, lr: float, weight_decay: float,
           warmup: float, hard_negatives: float, holdout_fraction: float, seconds_budget: float | None, seed: int,
           progress: bool) -> dict:
    check_model_source(model_name, None)
    captions, jpegs = load_pairs(data)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    order = np.random.default_rng(seed).permutation(len(captions))
    n_held = min(len(captions) // 2, max(2, round(len(captions) * holdout_fraction)))
    held, train = order[:n_held], order[n_held:]
    held_captions, held_jpegs = [captions[i] for i in held], [jpegs[i] for i in held]

    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(model_name, pretrained=None)
    tokenizer = open_clip.get_tokenizer(model_name)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )
    loss_fn = ClipLoss()
    before = evaluate(model, tokenizer, preprocess_val, held_captions, held_jpegs, batch_size)

    batch_size = min(batch_size, len(train))
    neighbours = one_word_neighbours([captions[i] for i in train]) if hard_negatives > 0 else None
    rng = np.random.default_rng(seed)
    budget, cpu_started = StepBudget(steps, seconds_budget), time.process_time()
    step, losses, queue = 0, [], np.array([], dtype=np.int64)
    bar = tqdm(total=steps, desc="clip train", disable=not progress)
    model.train()
    while (done := budget.progress(step)) < 1.0:
        if len(queue) < 2 * batch_size:
            queue = np.concatenate([queue, rng.permutation(len(train))])
        if neighbours is None:
            batch, queue = queue[:batch_size], queue[batch_size:]
        else:
            batch, queue = _hard_negative_batch(queue, neighbours, batch_size, hard_negatives, rng)
        batch = train[batch]
        for group in optimizer.param_groups:
            group["lr"] = lr * warmup_then_decay(done, 1.0, warmup, "cosine", offset=1e-3)
        pixels = _pixels([jpegs[i] for i in batch], preprocess_train)
        tokens = tokenizer([captions[i] for i in batch])
        image_features, text_features, logit_scale = model(pixels, tokens)
        loss = loss_fn(image_features, text_features, logit_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        losses.append(float(loss.detach()))
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    train_seconds, cpu_seconds = budget.elapsed(), time.process_time() - cpu_started

    after = evaluate(model, tokenizer, preprocess_val, held_captions, held_jpegs, batch_size)
    head = max(1, min(10, len(losses) // 5))
    report = {
        "model_name": model_name,
        "pairs": len(captions),
        "train_pairs": len(train),
        "heldout_pairs": n_held,
        "steps": step,
        "batch_size": batch_size,
        "hard_negatives": hard_negatives,
        "train_seconds": round(train_seconds, 1),
        "train_cpu_seconds": round(cpu_seconds, 1),  # all threads; wall time is noisy on shared machines
        "train_loss_first": float(np.mean(losses[:head])) if losses else None,
        "train_loss_last": float(np.mean(losses[-head:])) if losses else None,
        "heldout_before": before,
        "heldout": after,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
    atomic_write(out_dir / CHECKPOINT_FILE, lambda staged: save_file(state, staged))
    write_json(
        out_dir / TRAINED_CONFIG_FILE, {"model_name": model_name, "checkpoint": CHECKPOINT_FILE, "report": report}
    )
    return report
