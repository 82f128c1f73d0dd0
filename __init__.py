"""cm3: an open-source toolkit for CM3Leon-style retrieval-augmented multimodal decoders.

The repository's top-level folders install as the sub-packages of this package
(``cm3.pipeline``, ``cm3.tokenizers``, ``cm3.index``, ``cm3.model``, ``cm3.workflows``).
"""

__version__ = "0.1.0"
