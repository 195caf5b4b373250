"""Thumbnails: small WebP images of stored photos, made on first request and cached on disk under the store.

Cache layout: `<db>/thumbs/<hash[:2]>/<content_hash>-<size>.webp`. A stored id always stands for the same
content (a changed file gets a new id), so a thumbnail keyed by the content hash never goes stale, and copies of
one photo share one thumbnail. Each file is written to a temporary name and renamed into place, so a reader (or
a crash) never sees half of one.
"""

from __future__ import annotations

import io
import logging
import os
import re
import tempfile
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from retrieval.errors import ImageLoadError

logger = logging.getLogger(__name__)

SIZE = 256  # pixels on the long side
QUALITY = 75  # WebP quality: photos at 256 px look clean, at ~10 KB each
_HASH = re.compile(r"[0-9a-f]{64}")


def thumbnail(image: Image.Image, size: int = SIZE, max_megapixels: float = 100.0) -> Image.Image:
    """An upright thumbnail with the long side at most `size`, decoded as cheaply as possible.

    A JPEG is decoded at the smallest DCT scale (1/2 .. 1/8) still at least `size` on each side, so a 12 MP photo
    is read at about 750 x 500 instead of being decoded whole.

    Raises:
        ImageLoadError: too many pixels (a decompression bomb), or undecodable.
    """
    if image.format == "JPEG":
        image.draft("RGB", (size, size))
    width, height = image.size
    if width * height > max_megapixels * 1e6:
        raise ImageLoadError(
            f"{width}x{height} is {width * height / 1e6:.0f} MP, above the {max_megapixels:g} MP limit"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns about odd EXIF it then skips
            image.seek(0)
            image.load()
            image = ImageOps.exif_transpose(image)
            if image.mode not in ("RGB", "RGBA"):
                image = image.convert("RGBA" if "transparency" in image.info or "A" in image.mode else "RGB")
            image.thumbnail((size, size), Image.Resampling.LANCZOS, reducing_gap=2.0)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageLoadError(f"cannot decode ({e})") from e
    return image


def webp_bytes(image: Image.Image) -> bytes:
    """An image as WebP."""
    out = io.BytesIO()
    image.save(out, "WEBP", quality=QUALITY, method=4)
    return out.getvalue()


class Thumbnails:
    """The thumbnail cache of one store.

    Args:
        directory: where thumbnails live (`<db>/thumbs`); created on first write.
        size: pixels on the long side.
        max_megapixels: refuse to decode larger originals.
    """

    def __init__(self, directory: Path, size: int = SIZE, max_megapixels: float = 100.0) -> None:
        self.directory = directory
        self.size = size
        self.max_megapixels = max_megapixels

    def path_for(self, content_hash: str) -> Path:
        """Where the thumbnail of some content lives.

        Raises:
            ValueError: not a SHA-256 hex digest (never let other text into a path).
        """
        if not _HASH.fullmatch(content_hash):
            raise ValueError(f"not a content hash: {content_hash!r}")
        return self.directory / content_hash[:2] / f"{content_hash}-{self.size}.webp"

    def get(self, source: Path, content_hash: str) -> Path:
        """The cached thumbnail of `source` (whose content has `content_hash`), made first if missing.

        Raises:
            ImageLoadError: the original cannot be decoded.
        """
        path = self.path_for(content_hash)
        if path.is_file():
            return path
        try:
            with Image.open(source) as image:
                data = webp_bytes(thumbnail(image, self.size, self.max_megapixels))
        except (UnidentifiedImageError, OSError) as e:
            raise ImageLoadError(f"cannot read the original ({type(e).__name__})") from e  # e names the file
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path
