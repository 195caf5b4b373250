"""A perceptual fingerprint of an image's pixels: a 63-bit DCT hash (pHash) of a 16 x 16 grey thumbnail.

The decoder computes it from the pixels it already holds and the store keeps it beside the vector. Duplicate
detection (`retrieval.duplicates`) asks two images with a near-identical embedding to have near-identical
fingerprints too: an embedding says what a picture shows, the fingerprint where its light and dark are, so two
different photos of the same kind of scene (same object, colours and layout; another background texture, the
object a little moved or turned) are told apart, while a re-encode, a resize, a light crop, a brightness change
or the next frame of a burst keep most bits.

The hash: the image in grey, box-filtered to `THUMB` x `THUMB`, its 2-D DCT-II, the lowest `KEEP` x `KEEP`
frequencies without the constant term (63 coefficients), one bit each: above or below their median. Bit 63 is
always 0, so a fingerprint fits a signed 64-bit column as it is.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

THUMB = 16  # side of the grey thumbnail the DCT runs on, px
KEEP = 8  # the lowest KEEP x KEEP frequencies (less the constant term) make the hash
BITS = KEEP * KEEP - 1


def _dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix [n, n]: row k is the k-th cosine basis vector."""
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    matrix = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * x + 1) * k / (2 * n))
    matrix[0] /= np.sqrt(2.0)
    return matrix


_DCT = _dct_matrix(THUMB)[:KEEP]  # [KEEP, THUMB]
_WEIGHTS = 1 << np.arange(BITS, dtype=np.uint64)  # bit i of the hash is coefficient i (row-major, DC left out)


def fingerprint(image: Image.Image) -> int:
    """The 63-bit perceptual hash of an upright image (any mode), as a non-negative int."""
    grey = np.asarray(image.convert("L").resize((THUMB, THUMB), Image.Resampling.BOX), np.float64)  # [T, T]
    coefficients = (_DCT @ grey @ _DCT.T).ravel()[1:]  # [KEEP * KEEP - 1], the constant term left out
    bits = (coefficients > np.median(coefficients)).astype(np.uint64)
    return int((bits * _WEIGHTS).sum())


def distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances between fingerprints, element by element ([N] int64 each, as stored) -> [N] int."""
    xor = np.bitwise_xor(np.asarray(a, np.int64), np.asarray(b, np.int64)).view(np.uint64)
    return np.bitwise_count(xor).astype(np.int64)
