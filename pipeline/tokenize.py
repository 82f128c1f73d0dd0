"""The tokenize stage of ``cm3 ingest`` (and ``cm3 tokenize``): raw shards -> token shards on Ray Data.

Ray Data reads the raw Parquet shards; an actor pool (GPU actors when the cluster has GPUs)
decodes each JPEG once, runs the VQ-GAN encoder, the BPE and, when a CLIP model is given, the
CLIP image and text encoders over a batch; the driver groups the results back by source shard
(``ShardAssembler``) and commits one token shard per raw shard, atomically and with the same
numbering, so a killed run resumes shard by shard.

Token shard ``NNNNN.parquet`` (one row per successfully tokenized image; docs/formats.md):
``key, url, caption, source_shard, text_ids (list<int32>: BPE ids), image_ids
(fixed_size_list<int16>[tokens_per_image]: VQ code ids)`` and, with CLIP, ``clip_image`` and
``clip_text`` (fixed_size_list<float16>[dim], unit norm). Both id columns hold the tokenizers'
own ids; ``Vocabulary`` maps them into the decoder's joint id space.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from cm3.core.errors import InputError
from cm3.core.files import write_json
from cm3.core.intact import load_json, parquet_metadata, parquet_pages
from cm3.core.shards import clear_staging, complete_shards, foreign_output, parquet_path, read_stats
from cm3.pipeline.shard_assembler import ShardAssembler

CONFIG_FILE = "tokenize_config.json"
RAW_COLUMNS = ["key", "url", "caption", "jpg", "status"]


def token_schema(tokens_per_image: int, clip_dim: int | None = None) -> pa.Schema:
    fields = [
        ("key", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("source_shard", pa.int32()),
        ("text_ids", pa.list_(pa.int32())),
        ("image_ids", pa.list_(pa.int16(), tokens_per_image)),
    ]
    if clip_dim:
        fields += [("clip_image", pa.list_(pa.float16(), clip_dim)), ("clip_text", pa.list_(pa.float16(), clip_dim))]
    return pa.schema(fields)


def _vectors(rows: list[np.ndarray | None], dim: int) -> pa.Array:
    values = [None if row is None else row.astype(np.float16) for row in rows]
    return pa.array(values, pa.list_(pa.float16(), dim))


def tokenizer_fingerprint(tokenizer_dir: Path, content_only: bool = False) -> str:
    """A digest of every file of the tokenizer artefact: token shards are only valid for that tokenizer. With
    ``content_only``, hidden files (a run's ``.done`` marker, editor leftovers) are left out, so the tokenizer a
    checkpoint carries (``MultimodalTokenizer.save`` of it, byte for byte) has the same digest as its source."""
    digest = hashlib.sha256()
    files = sorted(p for p in Path(tokenizer_dir).rglob("*") if p.is_file())
    if content_only:
        files = [p for p in files if not any(part.startswith(".") for part in p.relative_to(tokenizer_dir).parts)]
    for path in files:
        digest.update(str(path.relative_to(tokenizer_dir)).encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class TokenizeBatch:
    """Ray Data actor: decode images once, VQ-encode them in one batch, BPE-encode the captions.

    Rows that cannot be tokenized come back with ``image_ids`` null and ``error`` set, so the
    driver can count them by reason; nothing is dropped silently.
    """

    def __init__(self, tokenizer_dir: str, device: str = "cpu", torch_threads: int = 1, clip: dict | None = None):
        import torch

        from cm3.tokenizers.multimodal import MultimodalTokenizer

        torch.set_num_threads(max(1, torch_threads))
        self.tokenizer = MultimodalTokenizer.load(tokenizer_dir, device=device)
        if torch.device(device).type == "cuda":  # compiled encode on GPUs (docs/benchmarks.md)
            self.tokenizer.vq.for_inference(device, compile=True)
        self.device = device
        self.resolution = self.tokenizer.vq.config.resolution
        self.clip = None
        if clip is not None:
            from cm3.tokenizers.clip_embedder import ClipEmbedder

            self.clip = ClipEmbedder(clip["model_name"], clip["pretrained"], device=device)

    def _decode(self, jpg: bytes | None) -> tuple[np.ndarray | None, str | None]:
        """The raw shard's pixels; cm3 ingest wrote them at the tokenizer's resolution, anything else is refused."""
        from PIL import UnidentifiedImageError

        from cm3.core.images import decode, rgb_pixels

        if jpg is None:
            return None, "not downloaded"
        try:
            image = decode(jpg)
            if image.size != (self.resolution, self.resolution):
                return None, f"image is {image.size[0]}x{image.size[1]}, expected {self.resolution}x{self.resolution}"
            return rgb_pixels(image), None
        except (UnidentifiedImageError, OSError, ValueError) as err:
            return None, f"undecodable image: {type(err).__name__}"

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        from cm3.core.images import to_float

        decoded = [self._decode(jpg) for jpg in batch.column("jpg").to_pylist()]
        good = [i for i, (pixels, _) in enumerate(decoded) if pixels is not None]
        codes: dict[int, np.ndarray] = {}
        if good:
            pixels = torch.from_numpy(np.stack([decoded[i][0] for i in good])).to(self.device)
            images = to_float(pixels.permute(0, 3, 1, 2))
            flat = self.tokenizer.vq.encode(images).reshape(len(good), -1).cpu().numpy().astype(np.int16)
            codes = dict(zip(good, flat))
        captions = [c or "" for c in batch.column("caption").to_pylist()]
        text_ids = self.tokenizer.text.encode_batch(captions)
        source = [int(Path(p).name.split(".")[0]) for p in batch.column("path").to_pylist()]
        columns = {
            "key": batch.column("key"),
            "url": batch.column("url"),
            "caption": batch.column("caption"),
            "source_shard": pa.array(source, pa.int32()),
            "text_ids": pa.array(text_ids, pa.list_(pa.int32())),
            "image_ids": pa.array([codes[i].tolist() if i in codes else None for i in range(batch.num_rows)],
                                  pa.list_(pa.int16(), self.tokenizer.tokens_per_image)),
        }
        if self.clip is not None:
            image_vectors = dict(zip(good, self.clip.embed_images(np.stack([decoded[i][0] for i in good])))) \
                if good else {}
            columns["clip_image"] = _vectors([image_vectors.get(i) for i in range(batch.num_rows)], self.clip.dim)
            columns["clip_text"] = _vectors(list(self.clip.embed_texts(captions)), self.clip.dim)
        columns["error"] = pa.array([err for _, err in decoded], pa.string())
        return pa.table(columns)


@dataclass(frozen=True)
class TokenizeSettings:
    """How the tokenize stage runs on Ray (``cm3 tokenize`` takes its defaults from here); what it writes is
    decided by the tokenizer folder alone."""

    batch_size: int = 32  # images per VQ-encoder call
    encoders: int | None = None  # VQ-encoder actors; None: one per GPU, else half the cluster's CPUs
    cpus_per_encoder: float = 1.0  # Ray CPUs, and torch threads, per encoder actor


@dataclass
class TokenizeResult:
    shards_written: list[int] = field(default_factory=list)
    shards_skipped_complete: int = 0
    rows_tokenized: int = 0
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


def _check_folder(tokens_dir: Path, config: dict) -> None:
    """Token shards in one folder share one tokenizer and one CLIP model; refuse to mix, and refuse a folder that
    another stage wrote."""
    check_tokens_out(tokens_dir)
    path = tokens_dir / CONFIG_FILE
    if path.exists():
        previous = load_json(path)
        if previous.get("tokenizer_sha256") != config["tokenizer_sha256"]:
            raise InputError(
                f"{tokens_dir}: holds token shards from another tokenizer (tokenizer_sha256 "
                f"{previous.get('tokenizer_sha256', '?')[:12]} != {config['tokenizer_sha256'][:12]}); "
                "choose another --out"
            )
        if previous.get("clip") != config["clip"]:
            raise InputError(f"{tokens_dir}: holds token shards with CLIP {previous.get('clip')}, not "
                             f"{config['clip']}; choose another --out")
    tokens_dir.mkdir(parents=True, exist_ok=True)
    write_json(path, config)


def tokenizer_identity(tokenizer_dir: Path) -> dict:
    """What shards record of the tokenizer that made them (``recorded_tokenizer`` reads it back)."""
    return {"tokenizer_sha256": tokenizer_fingerprint(tokenizer_dir),
            "tokenizer_content_sha256": tokenizer_fingerprint(tokenizer_dir, content_only=True)}


def check_tokens_out(tokens_dir: Path) -> None:
    """Refuse a token shard folder that another stage wrote (raw shards, an index, a checkpoint, ...)."""
    if (other := foreign_output(Path(tokens_dir), (CONFIG_FILE,), shards_need_own=True)) is not None:
        raise InputError(f"{tokens_dir}: holds {other}, not token shards; choose another --out")


def read_tokens_config(tokens_dir: Path) -> dict:
    path = Path(tokens_dir) / CONFIG_FILE
    if not path.exists():
        raise InputError(f"{tokens_dir}: not a token shard folder ({CONFIG_FILE} is missing); run cm3 tokenize")
    config = load_json(path)
    if not isinstance(config, dict) or not isinstance(config.get("tokenizer_sha256"), str):
        raise InputError(f"{path}: expected a JSON object with tokenizer_sha256, the tokenizer's fingerprint")
    return config


def recorded_tokenizer(folder: Path) -> tuple[dict, Path] | None:
    """The fingerprints (``tokenizer_sha256``, and ``tokenizer_content_sha256`` when recorded) of the tokenizer a
    shard folder was made with, and the file that records them: token shards' ``tokenize_config.json``, or the
    stats files of augmented and SFT task shards; None when nothing records one (shards written by hand). A folder
    whose stats name two tokenizers is refused."""
    folder = Path(folder)
    keys = ("tokenizer_sha256", "tokenizer_content_sha256")
    if (folder / CONFIG_FILE).is_file():
        config = read_tokens_config(folder)
        return {k: config[k] for k in keys if isinstance(config.get(k), str)}, folder / CONFIG_FILE
    found: dict[str, tuple[dict, Path]] = {}
    for stats in sorted(folder.glob("*_stats.json")):
        content = load_json(stats)
        if isinstance(content, dict) and isinstance(content.get(keys[0]), str):
            found.setdefault(content[keys[0]], ({k: content[k] for k in keys if isinstance(content.get(k), str)},
                                                stats))
    if len(found) > 1:
        (a, (_, path_a)), (b, (_, path_b)) = list(found.items())[:2]
        raise InputError(f"{folder}: holds shards of two tokenizers ({path_a.name}: {a[:12]}, {path_b.name}: "
                         f"{b[:12]})")
    return next(iter(found.values()), None)


def check_made_with(folder: Path, tokenizer_dir: Path, flag: str) -> None:
    """Refuse shards whose ids come from another tokenizer than ``tokenizer_dir`` (``flag`` names the option
    that chose it): the same ids would mean other words and image codes. The content digest is compared when the
    folder records one (a checkpoint's copy of a tokenizer matches its source), else the digest of every file."""
    recorded = recorded_tokenizer(folder)
    if recorded is None:
        return
    theirs, source = recorded
    key = "tokenizer_content_sha256" if "tokenizer_content_sha256" in theirs else "tokenizer_sha256"
    ours = tokenizer_fingerprint(tokenizer_dir, content_only=key == "tokenizer_content_sha256")
    if theirs[key] != ours:
        raise InputError(f"{folder}: its shards were made with tokenizer {theirs[key][:12]} (recorded in "
                         f"{source.name}), not with {flag} {tokenizer_dir} ({ours[:12]}); tokenize the data with "
                         "that tokenizer, or train with the one that made the shards")


def check_tokenizer_folder(tokenizer_dir: Path) -> None:
    for name in ("vocabulary.json", "text/tokenizer.json", "vq/config.json"):
        if not (Path(tokenizer_dir) / name).exists():
            raise InputError(f"{tokenizer_dir}: not a cm3 tokenizer (missing {name}); build one with cm3 tokenizer build")


def check_tokenize_inputs(raw_dir: Path, tokenizer_dir: Path, tokens_dir: Path | None = None) -> list[int]:
    """Validate before any work; returns the complete raw shard ids."""
    if tokens_dir is not None:
        check_tokens_out(tokens_dir)
    if not Path(raw_dir).is_dir():
        raise InputError(f"{raw_dir}: no such folder of raw shards")
    shards = complete_shards(Path(raw_dir))
    if not shards:
        raise InputError(f"{raw_dir}: no complete raw shards (NNNNN.parquet with NNNNN_stats.json); run cm3 ingest")
    check_tokenizer_folder(tokenizer_dir)
    for shard in shards:  # every footer whole before Ray starts: a damaged raw shard is named here
        parquet_metadata(parquet_path(Path(raw_dir), shard))
    return shards


def run_tokenize(raw_dir: Path, tokens_dir: Path, tokenizer_dir: Path, *, clip: dict | None = None,
                 settings: TokenizeSettings = TokenizeSettings(), progress: bool = True) -> TokenizeResult:
    """Tokenize every complete raw shard that has no complete token shard yet (needs a Ray connection).

    ``clip`` ({"model_name", "pretrained"}, see ``ClipEmbedder``) adds CLIP vectors computed from the
    same decoded pixels, so ``cm3 build-index`` never decodes the images again.
    """
    import ray

    from cm3.tokenizers.multimodal import MultimodalTokenizer

    raw_dir, tokens_dir, tokenizer_dir = Path(raw_dir), Path(tokens_dir), Path(tokenizer_dir)
    shards = check_tokenize_inputs(raw_dir, tokenizer_dir)
    tokens_per_image = MultimodalTokenizer.load(tokenizer_dir).tokens_per_image
    clip_dim = None
    if clip is not None:
        from cm3.tokenizers.clip_embedder import ClipEmbedder

        clip_dim = ClipEmbedder(clip["model_name"], clip["pretrained"]).dim  # fails here, early, on a bad model
    _check_folder(tokens_dir, {**tokenizer_identity(tokenizer_dir),
                               "tokens_per_image": tokens_per_image, "clip": clip, "clip_dim": clip_dim,
                               "raw_dir": str(raw_dir.resolve())})
    clear_staging(tokens_dir)
    done = set(complete_shards(tokens_dir))
    expected = {s: read_stats(raw_dir, s)["count"] for s in shards if s not in done}
    assembler = ShardAssembler(tokens_dir, expected, token_schema(tokens_per_image, clip_dim),
                               {"tokens_per_image": tokens_per_image})
    for shard_id in [s for s, count in expected.items() if count == 0]:  # nothing flows through Ray Data for these
        assembler.commit(shard_id)
    pending = [s for s, count in expected.items() if count > 0]

    started = time.time()
    if pending:
        gpus = ray.cluster_resources().get("GPU", 0)
        encoders = settings.encoders
        if encoders is None:
            encoders = int(gpus) if gpus >= 1 else max(1, int(ray.cluster_resources().get("CPU", 1) // 2))
        # One block per raw shard: otherwise Ray Data merges small files into one block, every token shard
        # arrives (and commits) at the very end, and a killed run has nothing to resume from.
        dataset = ray.data.read_parquet(
            [str(parquet_path(raw_dir, s)) for s in pending], columns=RAW_COLUMNS, include_paths=True,
            override_num_blocks=len(pending),
        ).map_batches(
            TokenizeBatch,
            fn_constructor_kwargs={"tokenizer_dir": str(tokenizer_dir.resolve()),
                                   "device": "cuda" if gpus >= 1 else "cpu",
                                   "torch_threads": max(1, int(settings.cpus_per_encoder)), "clip": clip},
            batch_size=settings.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=encoders),
            num_gpus=1 if gpus >= 1 else 0,
            num_cpus=settings.cpus_per_encoder,
        )
        try:
            with tqdm(total=sum(expected[s] for s in pending), desc="tokenize", unit="img", disable=not progress,
                      dynamic_ncols=True) as bar:
                for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
                    bar.update(assembler.add(batch))
        except Exception:
            clear_staging(tokens_dir)  # complete shards stay for a re-run; no half-written one does
            for shard_id in assembler.missing():  # a damaged page behind an intact footer: name its file
                parquet_pages(parquet_path(raw_dir, shard_id), columns=RAW_COLUMNS)
            raise
    clear_staging(tokens_dir)
    if assembler.missing():
        raise RuntimeError(f"tokenize: shards {assembler.missing()} did not receive all their rows; run again")
    return TokenizeResult(shards_written=assembler.written, shards_skipped_complete=len(done),
                          rows_tokenized=assembler.kept, skipped_by_reason=assembler.skipped_by_reason(),
                          seconds=time.time() - started)
