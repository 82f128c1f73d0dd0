"""A text-to-image evaluation run: generate (or reuse) images for every setting of the ablation grid, score them.

For each setting (``--retrieved`` x ``--guidance`` x ``--method``) the images come from ``samples.py``; the kept
image of a prompt is every sample, or with ``rerank`` the one with the best CLIP score (the paper's FID recipe: 8
samples, keep 1). The kept images are scored shard by shard, so memory stays at one shard whatever the run's size:

- ``fid``: Fréchet distance to the references in the FID Inception's space;
- ``fd_clip``: the same in CLIP's image space;
- ``clip_score``: the kept images against their prompts.

Reference statistics are cached under ``DIR/reference_stats/`` by the references' fingerprint, image size and
network, so a re-run or another setting does not read the references again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from cm3.evaluation.clip_scores import pair_scores
from cm3.evaluation.frechet import FeatureStatistics, frechet_distance, statistics
from cm3.evaluation.options import TextToImageOptions
from cm3.evaluation.samples import generate_samples, identity, read_samples, sample_folder
from cm3.evaluation.sources import ReferenceImages, as_batch, read_prompts



class Scorers:
    """The networks a run scores with, loaded before anything is generated (a missing file fails first)."""

    def __init__(self, options: TextToImageOptions):
        from cm3.evaluation.inception import load_inception, resolve_weights

        self.options = options
        self.inception = self.inception_weights = self.clip = None
        if "fid" in options.metrics:
            self.inception_weights = resolve_weights(options.inception)
            self.inception = load_inception(self.inception_weights, options.device)
        if {"fd_clip", "clip_score"} & set(options.metrics) or options.rerank:
            from cm3.tokenizers.clip_embedder import ClipEmbedder

            self.clip = ClipEmbedder(options.clip["model_name"], options.clip["pretrained"], device=options.device,
                                     batch_size=options.batch_size)

    def inception_features(self, pixels: list[np.ndarray]) -> np.ndarray:
        from cm3.evaluation.inception import inception_features

        size = self.options.batch_size
        batches = (as_batch(pixels[i:i + size]) for i in range(0, len(pixels), size))
        return inception_features(self.inception, batches).numpy()

    def reference_statistics(self, references: ReferenceImages, size: int, cache: Path) -> dict[str, FeatureStatistics]:
        """Inception and CLIP statistics of the references at ``size`` pixels, from the cache when it has them."""
        networks = {}
        if self.inception is not None:
            weights = self.inception_weights
            networks["fid"] = f"{weights.resolve()}|{weights.stat().st_size}|{weights.stat().st_mtime_ns}"
        if self.clip is not None and "fd_clip" in self.options.metrics:
            networks["fd_clip"] = json.dumps(self.clip.identity, sort_keys=True)
        paths = {name: cache / f"{name}-{references.fingerprint()}-{size}-"
                                f"{hashlib.sha256(key.encode()).hexdigest()[:10]}.npz" for name, key in networks.items()}
        missing = [name for name, path in paths.items() if not path.is_file()]
        if missing:
            features: dict[str, list[np.ndarray]] = {name: [] for name in missing}
            batches = references.batches(size, self.options.batch_size)
            for pixels in tqdm(batches, total=-(-references.count // self.options.batch_size), desc="references",
                               unit="batch"):
                if "fid" in features:
                    features["fid"].append(self.inception_features(pixels))
                if "fd_clip" in features:
                    features["fd_clip"].append(self.clip.embed_images(pixels))
            cache.mkdir(parents=True, exist_ok=True)
            for name, chunks in features.items():
                statistics(np.concatenate(chunks)).save(paths[name])
        return {name: FeatureStatistics.load(path) for name, path in paths.items()}


def score_setting(folder: Path, scorers: Scorers, reference: dict[str, FeatureStatistics],
                  grid: int) -> tuple[dict[str, Any], dict[int, np.ndarray]]:
    """The setting's metrics (each with its sample count) and the kept image of each of its first ``grid`` prompts."""
    options = scorers.options
    inception, clip_vectors, scores, shown, count = [], [], [], {}, 0
    for shard in read_samples(folder):
        kept = range(len(shard.pixels))
        if scorers.clip is not None:
            images = scorers.clip.embed_images(shard.pixels)
            prompts = sorted(set(shard.prompt))
            texts = dict(zip(prompts, scorers.clip.embed_texts(prompts)))
            pair = pair_scores(images, np.stack([texts[p] for p in shard.prompt]))
            if options.rerank:
                best: dict[int, int] = {}
                for i, index in enumerate(shard.prompt_index):
                    if index not in best or pair[i] > pair[best[index]]:
                        best[index] = i
                kept = sorted(best.values())
            clip_vectors.append(images[kept])
            scores.append(pair[kept])
        pixels = [shard.pixels[i] for i in kept]
        if scorers.inception is not None:
            inception.append(scorers.inception_features(pixels))
        count += len(pixels)
        for i in kept:
            if shard.prompt_index[i] < grid:
                shown.setdefault(shard.prompt_index[i], shard.pixels[i])
    row: dict[str, Any] = {}
    if "fid" in options.metrics:
        row["fid"] = {"value": frechet_distance(statistics(np.concatenate(inception)), reference["fid"]),
                      "samples": count, "references": reference["fid"].count}
    if "fd_clip" in options.metrics:
        row["fd_clip"] = {"value": frechet_distance(statistics(np.concatenate(clip_vectors)), reference["fd_clip"]),
                          "samples": count, "references": reference["fd_clip"].count}
    if "clip_score" in options.metrics:
        row["clip_score"] = {"value": float(np.concatenate(scores).mean()), "samples": count}
    return row, shown


def evaluate_text_to_image(options: TextToImageOptions) -> dict:
    """Run every setting, write ``metrics.json`` and ``report.md`` in ``options.out``, return the metrics."""
    from cm3.evaluation.report import write_report
    from cm3.model.checkpoint import load_checkpoint

    prompts = read_prompts(options.prompts, options.limit, options.seed)
    references = ReferenceImages.open(options.references) if {"fid", "fd_clip"} & set(options.metrics) else None
    scorers = Scorers(options)
    model, tokenizer = load_checkpoint(options.checkpoint, device=options.device)
    retrieve = None
    if any(options.retrieved):
        from cm3.index.query import Retriever

        retrieve = Retriever(options.index).for_text
    size = tokenizer.vq.config.resolution
    reference = scorers.reference_statistics(references, size, options.out / "reference_stats") if references else {}
    rows, grid = [], {}
    for setting in options.settings():
        ident = identity(options.checkpoint, prompts, setting, options.sampling, options.samples,
                         options.prompts_per_shard, options.index)
        folder = sample_folder(options.out / "samples", setting, ident)
        with tqdm(total=len(prompts) * options.samples, desc=setting.name, unit="img") as progress:
            generate_samples(folder, model, tokenizer, prompts, setting, options.sampling, options.samples,
                             options.prompts_per_shard, retrieve, progress)
        row, shown = score_setting(folder, scorers, reference, options.grid)
        rows.append({"setting": setting.name, "retrieved": setting.retrieved, "guidance": setting.guidance,
                     "method": setting.method, "samples_dir": str(folder.relative_to(options.out)), **row})
        grid[setting.name] = shown
    run = {"task": "text-to-image", "checkpoint": str(options.checkpoint), "prompts": str(options.prompts),
           "prompt_count": len(prompts), "references": str(options.references) if references else None,
           "reference_count": references.count if references else None, "samples_per_prompt": options.samples,
           "rerank": options.rerank, "seed": options.seed, "limit": options.limit,
           "clip": options.clip, "inception": str(scorers.inception_weights) if scorers.inception_weights else None,
           "sampling": {"temperature": options.temperature, "top_p": options.top_p, "cd_alpha": options.cd_alpha,
                        "cd_k": options.cd_k}}
    return write_report(options.out, run, rows, prompts[:options.grid], grid)
