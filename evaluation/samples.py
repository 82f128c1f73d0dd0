"""Generated images, kept: one shard folder per generation setting, in the project's shard commit protocol
(``cm3.core.shards``), so a killed run resumes at its first missing shard and a re-run that asks for other metrics
reads the images instead of generating them again.

    DIR/samples/<setting>-<hash>/generation.json    everything that made the images: checkpoint, prompts, settings
    DIR/samples/<setting>-<hash>/NNNNN.parquet      prompt_index int32, sample int16, prompt string, png binary
    DIR/samples/<setting>-<hash>/NNNNN_stats.json   {"count", "prompts": [first, end)}

The hash covers ``generation.json``: other prompts, another checkpoint or other sampling settings get a folder of
their own. Shard i holds prompts [i * P, (i + 1) * P) with all their samples, made by one call of the decoder with
seed ``seed + i``, so a shard's images do not depend on which shards ran before it.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from cm3.core.files import write_json
from cm3.core.images import decode, rgb_pixels, to_pil
from cm3.core.shards import clear_staging, commit_shard, complete_shards, new_attempt_dir, parquet_path, stats_path
from cm3.evaluation.options import MIX, Setting
from cm3.model.decoder import CM3
from cm3.model.generation import generate_image_tokens, text_to_image_prompt
from cm3.model.sampling_options import SamplingConfig
from cm3.tokenizers.multimodal import MultimodalTokenizer

SETTINGS_FILE = "generation.json"
SAMPLE_SCHEMA = pa.schema([("prompt_index", pa.int32()), ("sample", pa.int16()), ("prompt", pa.string()),
                           ("png", pa.binary())])
Retrieve = Callable[[str, int], Sequence[tuple[str, np.ndarray]]]  # (prompt, k) -> (caption, VQ codes) documents


def sample_folder(root: Path, setting: Setting, identity: dict) -> Path:
    """``root/<setting>-<hash of identity>``, with ``generation.json`` holding ``identity``."""
    text = json.dumps(identity, sort_keys=True)
    folder = root / f"{setting.name}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"
    if not (folder / SETTINGS_FILE).is_file():
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / SETTINGS_FILE, identity)
    return folder


def _png(image) -> bytes:
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format="PNG")
    return buffer.getvalue()


def generate_samples(folder: Path, model: CM3, tokenizer: MultimodalTokenizer, prompts: Sequence[str],
                     setting: Setting, sampling: SamplingConfig, samples: int, prompts_per_shard: int,
                     retrieve: Retrieve | None = None, progress: tqdm | None = None) -> None:
    """Fill ``folder`` with ``samples`` images per prompt, shard by shard, skipping complete shards."""
    if setting.retrieved and retrieve is None:
        raise ValueError(f"{setting.name}: retrieved documents need an index")
    clear_staging(folder)
    done = set(complete_shards(folder))
    vocab = tokenizer.vocab
    methods = ["top_p"] * (samples - samples // 2) + ["cd_k"] * (samples // 2) if setting.method == MIX else None
    for shard, start in enumerate(range(0, len(prompts), prompts_per_shard)):
        chunk = prompts[start:start + prompts_per_shard]
        if shard in done:
            if progress is not None:
                progress.update(len(chunk) * samples)
            continue
        ids = []
        for prompt in chunk:
            documents = retrieve(prompt, setting.retrieved) if setting.retrieved else ()
            ids += [text_to_image_prompt(tokenizer, prompt, documents)] * samples
        config = replace(sampling, guidance_scale=setting.guidance, seed=sampling.seed + shard,
                         method="top_p" if setting.method == MIX else setting.method)
        image_ids = generate_image_tokens(model, vocab, ids, tokenizer.tokens_per_image, config,
                                          None if methods is None else methods * len(chunk))
        pngs = [_png(image) for image in tokenizer.decode_image(image_ids)]
        table = pa.table({"prompt_index": [start + i // samples for i in range(len(pngs))],
                          "sample": [i % samples for i in range(len(pngs))],
                          "prompt": [chunk[i // samples] for i in range(len(pngs))], "png": pngs},
                         schema=SAMPLE_SCHEMA)
        attempt = new_attempt_dir(folder, shard)
        pq.write_table(table, attempt / parquet_path(folder, shard).name)
        write_json(attempt / stats_path(folder, shard).name, {"count": len(pngs), "prompts": [start, start + len(chunk)]})
        commit_shard(attempt, folder, shard)
        if progress is not None:
            progress.update(len(pngs))


@dataclass
class SampleShard:
    """One shard read back: per image its prompt index, sample number, prompt and uint8 [H, W, 3] pixels."""

    prompt_index: list[int]
    sample: list[int]
    prompt: list[str]
    pixels: list[np.ndarray]


def read_samples(folder: Path) -> Iterator[SampleShard]:
    for shard in complete_shards(folder):
        table = pq.read_table(parquet_path(folder, shard))
        yield SampleShard(table["prompt_index"].to_pylist(), table["sample"].to_pylist(), table["prompt"].to_pylist(),
                          [rgb_pixels(decode(png)) for png in table["png"].to_pylist()])


def identity(checkpoint: Path, prompts: Sequence[str], setting: Setting, sampling: SamplingConfig, samples: int,
             prompts_per_shard: int, index: Path | None) -> dict:
    """What ``generation.json`` records: the files of the checkpoint (name, size, time), the prompts' digest, the
    setting and every sampling number, and the index when documents are retrieved."""
    files = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(Path(checkpoint).iterdir()) if p.is_file()}
    return {"checkpoint": str(Path(checkpoint).resolve()), "checkpoint_files": files,
            "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(), "prompts": len(prompts),
            "setting": asdict(setting), "samples_per_prompt": samples, "prompts_per_shard": prompts_per_shard,
            "sampling": {k: v for k, v in asdict(sampling).items() if k not in ("guidance_scale", "method")},
            "index": str(Path(index).resolve()) if setting.retrieved and index is not None else None}
