"""Array aliases shared across the engine."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

# [N, D] float32, each row L2-normalised, so inner product == cosine similarity.
Embeddings = npt.NDArray[np.float32]
# [N] int64 stable row ids of the store.
RowIds = npt.NDArray[np.int64]
