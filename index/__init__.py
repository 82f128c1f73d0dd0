"""Retrieval: the document store, the FAISS index, the paper's retrieval filters and the augmented shards."""
