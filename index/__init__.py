"""Retrieval: OpenCLIP document vectors, the FAISS index and the paper's retrieval filters."""
