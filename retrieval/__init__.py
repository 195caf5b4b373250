"""The engine: the CLIP model, the LanceDB store, the FAISS index and queries.

Nothing here imports `indexer` or `clipsearch`.
"""
