"""Tiny Chameleon sources built with the real classes: Hugging Face `ChameleonForConditionalGeneration` folders,
Meta's release layout written from the same weights with Meta's key names, Chameleon's BPE and VQ-GAN files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from cm3.tokenizers.vqgan import VQGAN, VQGANConfig

N_CODES = 64
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]
MARKERS = ["<eoss>", "<racm3:break>", "<reserved08706>"]
# taming's layout at 32 x 32 pixels, f8: 4 x 4 = 16 tokens per image (Chameleon's is 512 px, f16, 32 x 32)
VQ = dict(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, attn_resolutions=(), z_channels=32, resolution=32,
          embed_dim=8, n_embed=N_CODES)


def image_name(code: int) -> str:
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def vocabulary_map() -> dict[str, int]:
    """Chameleon's order: specials, then the image tokens (here in shuffled code order: ids are not codes + an
    offset), then markers, then the byte-level alphabet as text."""
    codes = list(range(N_CODES))
    random.Random(0).shuffle(codes)
    names = [*SPECIALS, *(image_name(c) for c in codes), *MARKERS, *pre_tokenizers.ByteLevel.alphabet()]
    return {name: i for i, name in enumerate(names)}


def write_text_tokenizer(path: Path) -> dict[str, int]:
    vocab = vocabulary_map()
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([*SPECIALS, *MARKERS])
    tokenizer.save(str(path))
    return vocab


def write_vqgan(ckpt: Path, config_yaml: Path, n_embed: int = N_CODES) -> VQGAN:
    """A taming-layout VQ-GAN checkpoint ({"state_dict": ...}, with a loss.* key as taming writes) and its yaml."""
    torch.manual_seed(1)
    vq = VQGAN(VQGANConfig(**{**VQ, "n_embed": n_embed}))
    state = {**vq.state_dict(), "loss.discriminator.weight": torch.zeros(1)}
    torch.save({"state_dict": state}, ckpt)
    dd = {k: (list(v) if isinstance(v, tuple) else v) for k, v in VQ.items() if k not in ("embed_dim", "n_embed")}
    config = {"model": {"params": {"embed_dim": VQ["embed_dim"], "n_embed": n_embed,
                                   "ddconfig": {**dd, "double_z": False, "in_channels": 3, "out_ch": 3,
                                                "dropout": 0.0}}}}
    config_yaml.write_text(yaml.safe_dump(config))
    return vq


def hf_model(swin_norm: bool = False, n_kv_heads: int = 2, shards: int | None = None, seed: int = 0):
    """A random ChameleonForConditionalGeneration (fp32, eager attention) with non-trivial norms: RMSNorm weights,
    and query-key norm weights and biases that differ per head, or with `shards` per model-parallel shard (Meta's
    release has one affine per shard: 7B one, 30B four)."""
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    vocab = vocabulary_map()
    vq = {"embed_dim": VQ["embed_dim"], "num_embeddings": N_CODES, "latent_channels": VQ["z_channels"],
          "resolution": VQ["resolution"], "base_channels": VQ["ch"], "channel_multiplier": list(VQ["ch_mult"]),
          "num_res_blocks": 1, "attn_resolutions": []}
    config = ChameleonConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=n_kv_heads, max_position_embeddings=128,
                             rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}, swin_norm=swin_norm,
                             vq_config=vq, vocabulary_map=vocab, model_parallel_size=shards or 1, pad_token_id=1)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = ChameleonForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "vqmodel" in name:
                continue
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                weight.uniform_(0.5, 1.5)
            else:
                weight.normal_(0.0, 0.1)
        for layer in model.model.layers:
            for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
                heads = norm.weight.shape[0]
                groups = shards or heads
                for param, center in ((norm.weight, 1.0), (norm.bias, 0.0)):
                    per_group = center + 0.3 * torch.randn(groups, param.shape[1])
                    param.copy_(per_group.repeat_interleave(heads // groups, dim=0))
    return model


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Every logit, image tokens included (the class's forward masks those for text generation)."""
    with torch.no_grad():
        return model.lm_head(model.model(input_ids=ids).last_hidden_state).float()


def write_hf_folder(model, folder: Path, max_shard_size: str | None = None) -> Path:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    write_text_tokenizer(folder / "tokenizer.json")
    return folder


def _interleaved(w: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """Hugging Face's rotated-halves rows back to Meta's interleaved pairs (the inverse of its conversion)."""
    return w.reshape(heads, 2, head_dim // 2, -1).transpose(1, 2).reshape(w.shape)


def write_meta_release(model, root: Path, shards: int = 1, size: str = "7b") -> Path:
    """Meta's release layout from a Hugging Face model: models/SIZE/{params.json, consolidate_params.json,
    consolidated[.NN].pth} with Meta's key names, model-parallel splits and per-shard qk norms, and
    tokenizer/{text_tokenizer.json, vqgan.yaml, vqgan.ckpt}."""
    c = model.config
    heads, kv, dim = c.num_attention_heads, c.num_key_value_heads, c.hidden_size
    hd = dim // heads
    sd = {k: v.detach().clone() for k, v in model.state_dict().items() if "vqmodel" not in k}
    out = [dict() for _ in range(shards)]

    def split(key: str, tensor: torch.Tensor, axis: int) -> None:
        for rank, part in enumerate(tensor.chunk(shards, dim=axis)):
            out[rank][key] = part.clone()

    def norm_vector(w: torch.Tensor) -> torch.Tensor:  # [hd] halves -> interleaved
        return w.reshape(2, hd // 2).t().reshape(hd).clone()

    split("tok_embeddings.weight", sd["model.embed_tokens.weight"], 1)
    split("output.weight", sd["lm_head.weight"], 0)
    for rank in range(shards):
        out[rank]["norm.weight"] = sd["model.norm.weight"].clone()
        out[rank]["rope.freqs"] = torch.zeros(hd // 2)
    for n in range(c.num_hidden_layers):
        hf, meta = f"model.layers.{n}.", f"layers.{n}."
        split(meta + "attention.wq.weight", _interleaved(sd[hf + "self_attn.q_proj.weight"], heads, hd), 0)
        split(meta + "attention.wk.weight", _interleaved(sd[hf + "self_attn.k_proj.weight"], kv, hd), 0)
        split(meta + "attention.wv.weight", sd[hf + "self_attn.v_proj.weight"], 0)
        split(meta + "attention.wo.weight", sd[hf + "self_attn.o_proj.weight"], 1)
        split(meta + "feed_forward.w1.weight", sd[hf + "mlp.gate_proj.weight"], 0)
        split(meta + "feed_forward.w3.weight", sd[hf + "mlp.up_proj.weight"], 0)
        split(meta + "feed_forward.w2.weight", sd[hf + "mlp.down_proj.weight"], 1)
        for rank in range(shards):
            out[rank][meta + "attention_norm.weight"] = sd[hf + "input_layernorm.weight"].clone()
            out[rank][meta + "ffn_norm.weight"] = sd[hf + "post_attention_layernorm.weight"].clone()
            for ours, count in (("q", heads), ("k", kv)):
                for part in ("weight", "bias"):
                    head = rank * (count // shards)  # every head of a shard shares that shard's affine
                    w = sd[f"{hf}self_attn.{ours}_norm.{part}"][head]
                    out[rank][f"{meta}attention.{ours}_normalization.{part}"] = norm_vector(w)
    model_dir = root / "models" / size
    model_dir.mkdir(parents=True)
    params = {"model": {"dim": dim, "n_layers": c.num_hidden_layers, "n_heads": heads, "n_kv_heads": kv,
                        "norm_eps": c.rms_norm_eps, "rope_theta": 10_000.0, "qk_normalization": True,
                        "swin_norm": bool(c.swin_norm), "multiple_of": 32, "ffn_dim_multiplier": 0.5},
              "vocab_size": c.vocab_size}
    (model_dir / "params.json").write_text(json.dumps(params))
    (model_dir / "consolidate_params.json").write_text(json.dumps({"model_parallel_size": shards}))
    for rank, state in enumerate(out):
        name = "consolidated.pth" if shards == 1 else f"consolidated.{rank:02d}.pth"
        torch.save(state, model_dir / name)
    tokenizer = root / "tokenizer"
    tokenizer.mkdir()
    write_text_tokenizer(tokenizer / "text_tokenizer.json")
    write_vqgan(tokenizer / "vqgan.ckpt", tokenizer / "vqgan.yaml")
    return root
