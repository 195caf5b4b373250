"""Array aliases and small records shared across the engine (light imports: decoder workers load this)."""

from __future__ import annotations

from datetime import datetime
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

# [N, D] float32, each row L2-normalised, so inner product == cosine similarity.
Embeddings = npt.NDArray[np.float32]
# [N] int64 stable row ids of the store.
RowIds = npt.NDArray[np.int64]


class ImageMetadata(NamedTuple):
    """What the store records about an image's content besides its vector (None where unknown or absent)."""

    content_hash: str  # sha256 of the file's bytes, hex
    width: int | None  # as displayed, EXIF orientation applied
    height: int | None
    format: str | None  # Pillow's name: "JPEG", "PNG", ...
    taken_at: datetime | None  # EXIF capture time
    camera_make: str | None
    camera_model: str | None
    fingerprint: int | None = None  # perceptual hash of the pixels (`retrieval.fingerprint`), for duplicates
