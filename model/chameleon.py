"""`cm3 convert chameleon`: Meta's Chameleon release or a Hugging Face Chameleon/Anole folder -> a cm3 checkpoint.

Sources:

    Meta's release   SRC/models/7b/{params.json, consolidate_params.json, consolidated.pth | consolidated.NN.pth}
                     SRC/tokenizer/{text_tokenizer.json, vqgan.yaml, vqgan.ckpt}
    Hugging Face     SRC/{config.json, model.safetensors | model-*.safetensors + model.safetensors.index.json,
                     tokenizer.json}; the VQ-GAN's decoder is not in it: --vqgan CKPT --vqgan-config YAML

Key mapping (cm3 <- Hugging Face <- Meta), per layer N:

    blocks.N.attn.qkv          <- q_proj ++ k_proj ++ v_proj       <- permute(wq) ++ permute(wk) ++ wv
    blocks.N.attn.out          <- self_attn.o_proj                 <- attention.wo
    blocks.N.attn.{q,k}_norm   <- self_attn.{q,k}_norm [heads, hd] <- attention.{q,k}_normalization [hd] per shard
    blocks.N.mlp.{gate,up,down}<- mlp.{gate,up,down}_proj          <- feed_forward.{w1,w3,w2}
    blocks.N.attn_norm         <- input_layernorm                  <- attention_norm
    blocks.N.mlp_norm          <- post_attention_layernorm         <- ffn_norm
    tok_emb / norm / lm_head   <- embed_tokens / norm / lm_head    <- tok_embeddings / norm / output

Meta's weights rotate interleaved channel pairs; cm3 (like Hugging Face) rotates the two halves of a head, so
query and key rows and the query-key norm affines are permuted within each head. Model-parallel shards (30B) are
merged as Meta's loader splits them: heads, MLP rows and the output head concatenated, `wo`, `w2` and the token
embedding concatenated along their input, replicated RMSNorm weights averaged, and each shard's query-key norm
given to that shard's heads. Conversion streams: one layer is read, converted and written to a safetensors shard
at a time (`torch.load(mmap=True, weights_only=True)` or `safe_open`), so memory stays near one shard.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cm3.core.files import atomic_folder
from cm3.model.checkpoint import MARKER
from cm3.model.config import CM3Config
from cm3.model.decoder import CONFIG_NAME, CM3, TOKENIZER_DIR, WEIGHTS_INDEX_NAME
from cm3.tokenizers.chameleon import ChameleonVocabulary
from cm3.tokenizers.multimodal import MultimodalTokenizer
from cm3.tokenizers.text import TextTokenizer
from cm3.tokenizers.vqgan import VQGAN, VQGANConfig, read_state_dict

SHARD_BYTES = 2 * 2**30

HF_GLOBAL = {"model.embed_tokens.weight": "tok_emb.weight", "model.norm.weight": "norm.weight",
             "lm_head.weight": "lm_head.weight"}
HF_LAYER = {"self_attn.o_proj.weight": "attn.out.weight", "self_attn.q_norm.weight": "attn.q_norm.weight",
            "self_attn.q_norm.bias": "attn.q_norm.bias", "self_attn.k_norm.weight": "attn.k_norm.weight",
            "self_attn.k_norm.bias": "attn.k_norm.bias", "mlp.gate_proj.weight": "mlp.gate.weight",
            "mlp.up_proj.weight": "mlp.up.weight", "mlp.down_proj.weight": "mlp.down.weight",
            "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "mlp_norm.weight"}
HF_QKV = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
HF_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")
HF_IGNORED = ("model.vqmodel.",)  # the VQ-GAN's encoder: the tokenizer comes from --vqgan (which has the decoder)

META_LAYER = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
              "attention.q_normalization.weight", "attention.q_normalization.bias",
              "attention.k_normalization.weight", "attention.k_normalization.bias", "feed_forward.w1.weight",
              "feed_forward.w2.weight", "feed_forward.w3.weight", "attention_norm.weight", "ffn_norm.weight")
META_GLOBAL = ("tok_embeddings.weight", "norm.weight", "output.weight")
META_IGNORED = ("rope.freqs",)
META_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)")


class ConversionError(ValueError):
    """A source that cannot be converted; the message names the file and the key."""


@dataclass
class Conversion:
    out: Path
    config: CM3Config
    source_format: str
    shards: int
    peak_pending_bytes: int  # the most tensor bytes held for writing at once (streaming: about one shard)
    total_bytes: int


# --- output ----------------------------------------------------------------------------------------------------


class ShardWriter:
    """Collects converted tensors and writes them as numbered safetensors shards once `max_bytes` are pending, so
    a conversion never holds more than about one shard of converted weights."""

    def __init__(self, directory: Path, max_bytes: int):
        self.directory, self.max_bytes = directory, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.weight_map: dict[str, str] = {}
        self.files: list[str] = []
        self.peak = self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.pending[name] = tensor.contiguous()
        size = self._pending_bytes()
        self.peak = max(self.peak, size)
        if size >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"model-{len(self.files) + 1:05d}.safetensors"
        save_file(self.pending, str(self.directory / name), metadata={"format": "pt"})
        self.total += self._pending_bytes()
        self.files.append(name)
        self.weight_map.update(dict.fromkeys(self.pending, name))
        self.pending = {}

    def close(self) -> None:
        self.flush()
        index = {"metadata": {"total_size": self.total}, "weight_map": self.weight_map}
        (self.directory / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def _pending_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.pending.values())


# --- sources ---------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ConversionError(f"{path}: not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{path}: not valid JSON ({err})") from err


def chameleon_config(d_model: int, n_layers: int, n_heads: int, n_kv_heads: int, mlp_hidden: int, vocab_size: int,
                     norm_eps: float, rope_theta: float, swin_norm: bool, max_seq_len: int) -> CM3Config:
    """The cm3 decoder options that reproduce Chameleon exactly."""
    return CM3Config(vocab_size=vocab_size, n_layers=n_layers, d_model=d_model, n_heads=n_heads,
                     max_seq_len=max_seq_len, activation="swiglu", mlp_hidden_size=mlp_hidden, positions="rope",
                     rope_theta=rope_theta, norm="rmsnorm", norm_eps=norm_eps, n_kv_heads=n_kv_heads,
                     qk_norm=True, qk_norm_affine=True, swin_norm=swin_norm, tie_embeddings=False)


class HFSource:
    """A `ChameleonForConditionalGeneration` folder, read one tensor at a time from its safetensors files."""

    format = "hf"

    def __init__(self, root: Path):
        self.root = root
        cfg_path = root / CONFIG_NAME
        cfg = _read_json(cfg_path)
        if cfg.get("model_type") != "chameleon":
            raise ConversionError(f"{cfg_path}: model_type is {cfg.get('model_type')!r}, not 'chameleon'")
        for key in ("attention_bias", "mlp_bias"):
            if cfg.get(key):
                raise ConversionError(f"{cfg_path}: {key} true is not a Chameleon layout cm3 converts")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ConversionError(f"{cfg_path}: hidden_act {cfg['hidden_act']!r}; Chameleon's is silu")
        rope = cfg.get("rope_parameters") or {}
        try:
            self.config = chameleon_config(
                d_model=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
                n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                mlp_hidden=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
                norm_eps=cfg.get("rms_norm_eps", 1e-5), rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 1e4)),
                swin_norm=bool(cfg.get("swin_norm")), max_seq_len=cfg.get("max_position_embeddings", 4096))
        except KeyError as err:
            raise ConversionError(f"{cfg_path}: missing field {err}") from None
        except ValueError as err:
            raise ConversionError(f"{cfg_path}: {err}") from None
        self.files = self._weight_files()
        self.where: dict[str, Path] = {}
        for path in self.files:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    self.where[key] = path

    def _weight_files(self) -> list[Path]:
        index = self.root / WEIGHTS_INDEX_NAME
        if index.is_file():
            names = sorted(set(_read_json(index).get("weight_map", {}).values()))
            for name in names:
                if not (self.root / name).is_file():
                    raise ConversionError(f"{index}: names the shard {name}, which is missing from {self.root}")
            return [self.root / n for n in names]
        single = self.root / "model.safetensors"
        if not single.is_file():
            raise ConversionError(f"{self.root}: no model.safetensors nor {WEIGHTS_INDEX_NAME}")
        return [single]

    def tensor(self, key: str) -> torch.Tensor:
        if key not in self.where:
            raise ConversionError(f"{self.root}: missing key {key} (in none of {[p.name for p in self.files]})")
        with safe_open(str(self.where[key]), framework="pt") as f:
            return f.get_tensor(key)

    def check_keys(self) -> None:
        for key, path in self.where.items():
            if key.startswith(HF_IGNORED) or key in HF_GLOBAL:
                continue
            match = HF_LAYER_KEY.fullmatch(key)
            if not (match and int(match[1]) < self.config.n_layers and (match[2] in HF_LAYER or match[2] in HF_QKV)):
                raise ConversionError(f"{path}: unknown key {key} (not a Chameleon weight of this config)")

    def converted(self) -> Iterator[tuple[str, torch.Tensor, str]]:
        """(cm3 key, tensor, where it came from), layer by layer."""
        for hf, ours in HF_GLOBAL.items():
            yield ours, self.tensor(hf), f"{self.where.get(hf)}: key {hf}"
        for n in range(self.config.n_layers):
            prefix = f"model.layers.{n}."
            qkv = [self.tensor(prefix + k) for k in HF_QKV]
            where = f"{self.where[prefix + HF_QKV[0]]}: keys {prefix}self_attn.q/k/v_proj.weight"
            _check_rows(qkv, self.config, where)
            if len({t.shape[1:] for t in qkv}) > 1:
                raise ConversionError(f"{where}: shapes {[tuple(t.shape) for t in qkv]} do not fit together")
            yield f"blocks.{n}.attn.qkv.weight", torch.cat(qkv), where
            for hf, ours in HF_LAYER.items():
                key = prefix + hf
                yield f"blocks.{n}.{ours}", self.tensor(key), f"{self.where.get(key)}: key {key}"


class MetaSource:
    """Meta's release: params.json (+ consolidate_params.json) and one consolidated.*.pth per model-parallel rank,
    memory-mapped (tensors only, `weights_only=True`)."""

    format = "meta"

    def __init__(self, model_dir: Path):
        self.root = model_dir
        params = {**_read_json(model_dir / "params.json")}
        if (model_dir / "consolidate_params.json").is_file():
            params.update(_read_json(model_dir / "consolidate_params.json"))
        params = {**params, **params.get("model", {})}
        self.mp = int(params.get("model_parallel_size", 1))
        paths = [model_dir / "consolidated.pth"] if self.mp == 1 and (model_dir / "consolidated.pth").is_file() else \
            [model_dir / f"consolidated.{i:02d}.pth" for i in range(self.mp)]
        for path in paths:
            if not path.is_file():
                raise ConversionError(f"{path}: missing (model_parallel_size {self.mp} in {model_dir}/params.json "
                                      f"needs {', '.join(p.name for p in paths)})")
        self.paths = paths
        self.shards = []
        for path in paths:
            try:
                self.shards.append(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
            except Exception as err:  # weights_only refuses pickled code; a truncated file fails to open
                raise ConversionError(f"{path}: not a tensors-only checkpoint ({err})") from err
        try:
            dim, n_heads = int(params["dim"]), int(params["n_heads"])
            hidden = int(2 * 4 * dim / 3)
            if params.get("ffn_dim_multiplier") is not None:
                hidden = int(params["ffn_dim_multiplier"] * hidden)
            multiple = int(params.get("multiple_of", 256))
            hidden = multiple * ((hidden + multiple - 1) // multiple)
            vocab = int(params.get("vocab_size") or self.shards[0]["tok_embeddings.weight"].shape[0])
            theta = float(params.get("rope_theta", 10_000.0))
            if not params.get("qk_normalization", True):
                raise ConversionError(f"{model_dir}/params.json: qk_normalization false is not Chameleon's layout")
            self.config = chameleon_config(
                d_model=dim, n_layers=int(params["n_layers"]), n_heads=n_heads,
                n_kv_heads=int(params.get("n_kv_heads") or n_heads), mlp_hidden=hidden, vocab_size=vocab,
                norm_eps=float(params.get("norm_eps", 1e-5)), rope_theta=theta,
                swin_norm=bool(params.get("swin_norm", False)), max_seq_len=16384 if theta > 10_000 else 4096)
        except KeyError as err:
            raise ConversionError(f"{model_dir}/params.json: missing field {err}") from None
        except ValueError as err:
            raise ConversionError(f"{model_dir}/params.json: {err}") from None

    def tensor(self, key: str, rank: int) -> torch.Tensor:
        try:
            return self.shards[rank][key]
        except KeyError:
            raise ConversionError(f"{self.paths[rank]}: missing key {key}") from None

    def check_keys(self) -> None:
        for path, shard in zip(self.paths, self.shards):
            for key in shard:
                if key in META_GLOBAL or key in META_IGNORED:
                    continue
                match = META_LAYER_KEY.fullmatch(key)
                if not (match and int(match[1]) < self.config.n_layers and match[2] in META_LAYER):
                    raise ConversionError(f"{path}: unknown key {key} (not a Chameleon weight of this config)")

    def _all(self, key: str) -> list[torch.Tensor]:
        return [self.tensor(key, r) for r in range(self.mp)]

    def converted(self) -> Iterator[tuple[str, torch.Tensor, str]]:
        c = self.config
        hd, heads, kv = c.head_dim, c.n_heads, c.kv_heads
        where = f"{self.paths[0].parent}/{self.paths[0].name if self.mp == 1 else 'consolidated.*.pth'}"

        def halves(w: torch.Tensor, n: int) -> torch.Tensor:
            """Rows of n heads from interleaved rotary pairs (Meta) to rotated halves (cm3, Hugging Face)."""
            return w.reshape(n, hd // 2, 2, -1).transpose(1, 2).reshape(w.shape)

        def per_head(key: str, n: int) -> torch.Tensor:
            """Each shard's [hd] norm affine, permuted like its head's rows, for that shard's n / mp heads."""
            rows = [w.reshape(hd // 2, 2).t().reshape(1, hd) for w in self._all(key)]
            return torch.cat(rows).repeat_interleave(n // self.mp, dim=0)

        def cat(key: str, dim: int = 0) -> torch.Tensor:
            return torch.cat(self._all(key), dim=dim)

        def mean(key: str) -> torch.Tensor:
            return torch.stack(self._all(key)).mean(0)

        def qkv(p: str) -> torch.Tensor:
            q, k, v = (cat(f"{p}attention.{w}.weight") for w in ("wq", "wk", "wv"))
            _check_rows([q, k, v], c, f"{where}: keys {p}attention.wq/wk/wv")
            return torch.cat([halves(q, heads), halves(k, kv), v])

        plan: list[tuple[str, str, Callable[[], torch.Tensor]]] = [
            ("tok_emb.weight", "tok_embeddings.weight", lambda: cat("tok_embeddings.weight", 1)),
            ("norm.weight", "norm.weight", lambda: mean("norm.weight")),
            ("lm_head.weight", "output.weight", lambda: cat("output.weight"))]
        for n in range(c.n_layers):
            p, b = f"layers.{n}.", f"blocks.{n}."
            plan += [(b + "attn.qkv.weight", p + "attention.wq/wk/wv", lambda p=p: qkv(p)),
                     (b + "attn.out.weight", p + "attention.wo.weight", lambda p=p: cat(p + "attention.wo.weight", 1))]
            for ours, theirs, count in (("q_norm", "q_normalization", heads), ("k_norm", "k_normalization", kv)):
                for part in ("weight", "bias"):
                    key = f"{p}attention.{theirs}.{part}"
                    plan.append((f"{b}attn.{ours}.{part}", key, lambda key=key, count=count: per_head(key, count)))
            for ours, theirs, dim in (("gate", "w1", 0), ("up", "w3", 0), ("down", "w2", 1)):
                key = f"{p}feed_forward.{theirs}.weight"
                plan.append((f"{b}mlp.{ours}.weight", key, lambda key=key, dim=dim: cat(key, dim)))
            for ours, theirs in (("attn_norm", "attention_norm"), ("mlp_norm", "ffn_norm")):
                key = f"{p}{theirs}.weight"
                plan.append((f"{b}{ours}.weight", key, lambda key=key: mean(key)))
        for ours, theirs, make in plan:
            try:  # shards whose shapes do not fit each other or the heads fail in cat/reshape
                tensor = make()
            except RuntimeError as err:
                raise ConversionError(f"{where}: key {theirs}: {err}") from None
            yield ours, tensor, f"{where}: key {theirs}"


def _check_rows(parts: list[torch.Tensor], config: CM3Config, where: str) -> None:
    expected = [config.d_model, config.kv_heads * config.head_dim, config.kv_heads * config.head_dim]
    got = [t.shape[0] for t in parts]
    if got != expected:
        raise ConversionError(f"{where}: q/k/v have {got} rows; the config's heads need {expected}")


def open_source(src: Path, model_size: str | None = None) -> HFSource | MetaSource:
    """The source layout at src: a Hugging Face folder (config.json) or Meta's release (params.json, found in
    src, src/models/SIZE or the only folder under src/models)."""
    if (src / CONFIG_NAME).is_file():
        return HFSource(src)
    if (src / "params.json").is_file():
        return MetaSource(src)
    models = src / "models"
    sizes = sorted(p.name for p in models.iterdir() if (p / "params.json").is_file()) if models.is_dir() else []
    if model_size is not None:
        if model_size not in sizes:
            raise ConversionError(f"{models}: no model {model_size!r} (found {sizes})")
        return MetaSource(models / model_size)
    if len(sizes) == 1:
        return MetaSource(models / sizes[0])
    if sizes:
        raise ConversionError(f"{models}: holds {sizes}; choose one with --model-size")
    raise ConversionError(f"{src}: neither a Hugging Face Chameleon folder ({CONFIG_NAME}) nor Meta's release "
                          "(params.json, or models/SIZE/params.json)")


# --- tokenizer -------------------------------------------------------------------------------------------------


def chameleon_tokenizer(text_json: Path, vqgan_ckpt: Path, vqgan_yaml: Path, vocab_size: int) -> MultimodalTokenizer:
    """Chameleon's BPE and VQ-GAN as a cm3 tokenizer, after checking that they fit each other and the model."""
    import yaml

    for path in (text_json, vqgan_ckpt, vqgan_yaml):
        if not path.is_file():
            raise ConversionError(f"{path}: not found")
    try:
        text = TextTokenizer.from_file(text_json)
        vocab = ChameleonVocabulary.from_text_tokenizer(text, vocab_size)
    except Exception as err:  # the tokenizers library raises its own types for a malformed file
        raise ConversionError(f"{text_json}: {err}") from err
    if text.vocab_size != vocab_size:
        raise ConversionError(f"{text_json}: {text.vocab_size} tokens but the model has vocab_size {vocab_size}")
    try:
        config = VQGANConfig.from_taming(yaml.safe_load(vqgan_yaml.read_text()))
    except (ValueError, TypeError, yaml.YAMLError) as err:
        raise ConversionError(f"{vqgan_yaml}: {err}") from err
    state = read_state_dict(vqgan_ckpt)
    codebook = state.get("quantize.embedding.weight")
    if codebook is None:
        raise ConversionError(f"{vqgan_ckpt}: missing key quantize.embedding.weight (not a VQ-GAN checkpoint)")
    if codebook.shape[0] != vocab.image_vocab_size:
        raise ConversionError(f"{vqgan_ckpt}: key quantize.embedding.weight holds {codebook.shape[0]} codes but "
                              f"{text_json} names {vocab.image_vocab_size} image tokens (IMGIMG*)")
    try:
        vq = VQGAN.from_taming(vqgan_ckpt, config)
    except ValueError as err:
        raise ConversionError(f"{vqgan_ckpt}: {err}") from err
    return MultimodalTokenizer(text, vq, vocab)


# --- the conversion --------------------------------------------------------------------------------------------


def convert_chameleon(src: str | os.PathLike, out: str | os.PathLike, *, vqgan: str | os.PathLike | None = None,
                      vqgan_config: str | os.PathLike | None = None, model_size: str | None = None,
                      dtype: torch.dtype | None = None, shard_bytes: int = SHARD_BYTES,
                      progress: Callable[[str], None] | None = None) -> Conversion:
    """Convert, checking everything first, into a staging folder swapped in at `out` at the end (`atomic_folder`): an error leaves
    nothing at `out`. `out` must not exist yet. Every weight is stored in `dtype` (default: the dtype of the
    first weight read, the token embedding's)."""
    src, out = Path(src), Path(out)
    if out.exists():
        raise ConversionError(f"{out}: already exists; choose another --out or remove it")
    if not src.is_dir():
        raise ConversionError(f"{src}: no such folder")
    source = open_source(src, model_size)
    source.check_keys()
    config = source.config
    if isinstance(source, HFSource):
        if vqgan is None or vqgan_config is None:
            raise ConversionError(f"{src}: a Hugging Face folder has no VQ-GAN decoder; give --vqgan CKPT and "
                                  "--vqgan-config YAML (Meta's tokenizer/vqgan.ckpt and vqgan.yaml)")
        text_json = src / "tokenizer.json"
    else:
        tokenizer_dir = source.root.parent.parent / "tokenizer"
        text_json = tokenizer_dir / "text_tokenizer.json"
        vqgan = vqgan or tokenizer_dir / "vqgan.ckpt"
        vqgan_config = vqgan_config or tokenizer_dir / "vqgan.yaml"
    tokenizer = chameleon_tokenizer(text_json, Path(vqgan), Path(vqgan_config), config.vocab_size)

    with torch.device("meta"):
        expected = CM3(config).state_dict()
    with atomic_folder(out) as staging:
        writer = ShardWriter(staging, shard_bytes)
        written = set()
        for key, tensor, where in source.converted():
            if key not in expected:
                raise ConversionError(f"{where}: no cm3 weight {key} in this config")
            if tuple(tensor.shape) != tuple(expected[key].shape):
                raise ConversionError(f"{where}: shape {tuple(tensor.shape)} does not fit the config, which needs "
                                      f"{tuple(expected[key].shape)} for {key}")
            dtype = dtype or tensor.dtype  # one dtype for every weight: the first one read (the embedding's)
            writer.add(key, tensor.to(dtype))
            written.add(key)
            if progress and key.endswith("mlp_norm.weight"):
                progress(f"layer {int(key.split('.')[1]) + 1} of {config.n_layers} converted")
        if missing := sorted(set(expected) - written):
            raise ConversionError(f"{src}: no weights for {missing[:5]}")
        writer.close()
        (staging / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2))
        tokenizer.save(staging / TOKENIZER_DIR)
        info = {"format_version": 1, "stage": "converted", "source": str(src.resolve()),
                "source_format": source.format}
        (staging / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    return Conversion(out, config, source.format, len(writer.files), writer.peak, writer.total)
