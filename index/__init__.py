"""Retrieval: the document store, the FAISS index, the paper's retrieval filters and the augmented shards."""

from cm3.core.exports import lazy_exports

_EXPORTS = {  # public name -> the module that defines it
    "IndexSettings": "build", "run_build_index": "build", "Retriever": "query", "VectorIndex": "faiss_index",
    "build_index": "faiss_index", "DocStore": "doc_store", "build_online_index": "online_index",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
