"""cm3: an open-source toolkit for CM3Leon-style retrieval-augmented multimodal decoders.

The repository's top-level folders install as the sub-packages of this package
(``cm3.core``, ``cm3.tokenizers``, ``cm3.pipeline``, ``cm3.synthetic``, ``cm3.index``, ``cm3.model``,
``cm3.workflows``); each exports its public names (``from cm3.model import CM3, load_checkpoint``).
"""

__version__ = "0.1.0"

# cm3.tokenizers is a namespace portion (no __init__.py: from the repository root, `import tokenizers` must still
# find Hugging Face's package; tokenizers/README.md), so its public names are attached here, still lazily.
from cm3.core.exports import lazy_exports as _lazy_exports  # noqa: E402
from cm3 import tokenizers as _tokenizers  # noqa: E402

_tokenizers.__getattr__, _tokenizers.__dir__ = _lazy_exports("cm3.tokenizers", {
    "Vocabulary": "vocabulary", "VQGAN": "vqgan", "VQGANConfig": "vqgan", "TextTokenizer": "text",
    "MultimodalTokenizer": "multimodal", "build_tokenizer": "multimodal", "ChameleonVocabulary": "chameleon",
    "ClipEmbedder": "clip_embedder", "image_prompt": "layout", "caption_prompt": "layout",
    "encode_document": "layout", "decode_document": "layout",
})
