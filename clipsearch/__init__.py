"""clipsearch: local semantic image search with CLIP.

    import clipsearch
    model, preprocess = clipsearch.load_model("shapes-mini")
    vectors = clipsearch.embed_texts(["a red circle"], model=model)   # [1, D] float32, rows L2-normalised

Public names are imported on first use, so `import clipsearch` (and the CLI's start-up) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from clipsearch._version import __version__

# public name -> module that defines it
_EXPORTS = {
    "available_models": "retrieval.model.registry",
    "load_model": "retrieval.model.loading",
    "tokenize": "retrieval.model.tokenizer",
    "embed_images": "clipsearch.api",
    "embed_texts": "clipsearch.api",
    "Library": "clipsearch.library",
    "SearchResult": "retrieval.query",
}

__all__ = [
    "__version__",
    "available_models",
    "load_model",
    "tokenize",
    "embed_images",
    "embed_texts",
    "Library",
    "SearchResult",
]

if TYPE_CHECKING:
    from clipsearch.api import embed_images, embed_texts
    from clipsearch.library import Library
    from retrieval.model.loading import load_model
    from retrieval.model.registry import available_models
    from retrieval.model.tokenizer import tokenize
    from retrieval.query import SearchResult


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'clipsearch' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
