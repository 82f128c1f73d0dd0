"""The CM3 decoder, the causal-masked objective, training and generation.

``from cm3.model import CM3, load_checkpoint, text_to_image`` works without importing torch until one is used.
"""

from cm3.core.exports import lazy_exports

_EXPORTS = {  # public name -> the module that defines it
    "CM3": "decoder", "KVCache": "decoder", "CM3Config": "config", "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint", "load_tokenizer_and_config": "checkpoint",
    "SamplingConfig": "sampling_options", "text_to_image": "generation",
    "caption_image": "generation", "generate_image_tokens": "generation", "generate_text": "generation",
    "rerank_by_clip": "generation", "ImageEngine": "engine", "convert_chameleon": "chameleon",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
