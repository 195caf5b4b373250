"""CLIP's image preprocessing, plus the decoding that real photo folders need.

The transform reproduces openai/CLIP's: resize the shorter side to the model's resolution with
bicubic resampling, centre crop, RGB, scale to [0, 1], normalise with CLIP's mean and std. Before it,
images are decoded the way a photo viewer shows them: EXIF orientation applied, first frame of an
animation, transparency composited onto white, 16-bit and CMYK images brought to 8-bit RGB.

Nothing here imports torch until a tensor is asked for (`transform`): decoder workers use `crop_array`
and hand numpy arrays to the encoder, so they never pay for `import torch` (seconds on a busy machine).
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from retrieval.errors import ImageLoadError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# SigLIP's (Inception's) normalisation, mapping [0, 1] to [-1, 1].
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
# How an image becomes the model's square: "shortest" resizes the shorter side and centre-crops (CLIP),
# "squash" resizes both sides to S without cropping (open_clip's SigLIP preprocessing).
RESIZE_MODES = ("shortest", "squash")
# MobileCLIP2-S0/S2 feed raw [0, 1] pixels: no normalisation.
MOBILECLIP_MEAN = (0.0, 0.0, 0.0)
MOBILECLIP_STD = (1.0, 1.0, 1.0)
# Pillow's resampling filters by the names open_clip's preprocess_cfg uses (torchvision resizes PIL images with them).
INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}

# We enforce our own, configurable pixel limit (after draft() has shrunk a JPEG); Pillow's global one
# would refuse huge JPEGs that draft() decodes at 1/8 scale without ever holding the full image.
Image.MAX_IMAGE_PIXELS = None

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}

# Resized images larger than this many times the S x S crop (an aspect ratio beyond 16:1) are resampled within the
# crop only (`_resize_crop`), so the work and memory of `Preprocess.transform` stay bounded by its output whatever
# the aspect ratio; below it, plain resize-then-crop is as cheap.
_RESIZE_BUDGET = 16


def open_image(path: str | Path) -> Image.Image:
    """Open an image lazily (header only).

    Raises:
        ImageLoadError: the file is missing, unreadable or not an image Pillow knows.
    """
    try:
        return Image.open(path)
    except FileNotFoundError as e:
        raise ImageLoadError(f"{path}: no such file") from e
    except UnidentifiedImageError as e:
        raise ImageLoadError(f"{path}: not an image Pillow can read") from e
    except OSError as e:
        raise ImageLoadError(f"{path}: {decode_error_reason(e, 'cannot open')}") from e


def to_rgb(image: Image.Image, min_size: int | None = None, max_megapixels: float | None = 100.0) -> Image.Image:
    """Decode an opened image into upright 8-bit RGB.

    Args:
        image: an image from `open_image` (or any PIL image).
        min_size: when set, a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) whose shorter
            side stays >= min_size, which is several times faster and uses far less memory.
        max_megapixels: refuse images that would still be larger than this once drafted.

    Raises:
        ImageLoadError: too large, truncated or otherwise undecodable.
    """
    name = getattr(image, "filename", "") or "<image>"
    if min_size is not None and image.format == "JPEG":
        image.draft("RGB", (min_size, min_size))
    width, height = image.size
    if max_megapixels is not None and width * height > max_megapixels * 1e6:
        raise ImageLoadError(
            f"{name}: {width}x{height} is {width * height / 1e6:.0f} MP, above the {max_megapixels:g} MP limit; "
            "raise --max-megapixels to read it"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns about odd EXIF/palette data it then handles
            with contextlib.suppress(EOFError):  # a PSD's frames are its layers, from 1; as opened it is the composite
                image.seek(0)
            image.load()
            image = ImageOps.exif_transpose(image)
            return _as_rgb(image)
    except Exception as e:  # Pillow's plugins raise many types on damaged files: RuntimeError, EOFError, struct.error
        raise ImageLoadError(f"{name}: {decode_error_reason(e)}") from e


# What Pillow's messages (and codec status codes, ImageFile.ERRORS) mean for someone looking at the file.
_TRUNCATED = "truncated file: the image data ends early"
_CORRUPT = "corrupt or truncated image data"
_PILLOW_MESSAGES = (
    ("image file is truncated", _TRUNCATED),
    ("truncated file read", _TRUNCATED),
    ("not enough image data", _TRUNCATED),
    ("buffer overrun", "corrupt image data: more pixels than the image has room for"),
    ("broken data stream", _CORRUPT),
    ("unrecognized data stream", _CORRUPT),
    ("failed to read next frame", _CORRUPT),
    ("could not create decoder object", _CORRUPT),
    ("failed to decode", _CORRUPT),
    ("broken png", _CORRUPT),
    ("crc check failed", _CORRUPT),
    ("codec configuration", "a variant of the format this Pillow cannot decode"),
    ("out of memory", "not enough memory to decode it"),
    ("cannot load this image", "no image data in the file"),
    ("not available", "this Pillow has no decoder for this kind of image"),
)
_CODEC_STATUS = {
    -1: "corrupt image data: more pixels than the image has room for",
    -2: _CORRUPT,
    -3: _CORRUPT,
    -8: "a variant of the format this Pillow cannot decode",
    -9: "not enough memory to decode it",
}


def decode_error_reason(error: BaseException, fallback: str = "cannot decode") -> str:
    """Pillow's error in words a user can act on, with its own message kept in parentheses.

    "decoder error -2" becomes "corrupt or truncated image data (decoder error -2)"; a message not recognised
    becomes "cannot decode (<message>)".
    """
    raw = str(error) or type(error).__name__
    if not isinstance(error, (OSError, SyntaxError, ValueError)) and str(error):  # name the unusual types
        raw = f"{type(error).__name__}: {error}"
    if isinstance(error, MemoryError):
        return f"not enough memory to decode it ({raw})"
    text = str(error).lower()
    code = re.search(r"decoder error (-?\d+)", text)
    if code and int(code.group(1)) in _CODEC_STATUS:
        return f"{_CODEC_STATUS[int(code.group(1))]} ({raw})"
    words = next((words for fragment, words in _PILLOW_MESSAGES if fragment in text), fallback)
    return f"{words} ({raw})"


def _as_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB, with transparency composited onto white and 16/32-bit values scaled, not clipped."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        image = Image.fromarray(np.clip(values * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image) * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image if image.mode == "RGB" else image.convert("RGB")


def _resize_crop(
    image: Image.Image,
    new_size: tuple[int, int],
    corner: tuple[int, int],
    size: int,
    resample: Image.Resampling = Image.Resampling.BICUBIC,
) -> Image.Image:
    """`image.resize(new_size, resample).crop(...)` of the S x S square at `corner`, computing only that square.

    Resizing everything first would turn a 100000x1 strip into a 22400000x224 image at 224 px (15 GB). Pillow's
    `box` is the square's region in source pixels; the filter still reads the pixels around it, so the result is
    the same resampling, except that Pillow may order its two passes (rows, columns) differently for the region
    than for the whole image, which can move a few pixels of sharp detail by a few levels.
    """
    width, height = image.size
    scale_x, scale_y = width / new_size[0], height / new_size[1]
    left, top = corner[0] * scale_x, corner[1] * scale_y
    right, bottom = min((corner[0] + size) * scale_x, width), min((corner[1] + size) * scale_y, height)
    return image.resize((size, size), resample, box=(left, top, right, bottom))


@dataclass(frozen=True)
class Preprocess:
    """CLIP's transform for one model: PIL image or path -> float32 tensor [3, S, S].

    Picklable, so decoder worker processes can run it.
    """

    image_size: int  # side S of the square the model sees
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    # Decode large JPEGs reduced by draft() to no less than S on the shorter side: the DCT-domain reduction
    # averages whole 8x8 blocks (no aliasing), then the bicubic resize does the rest. On 12 MP photos this keeps
    # ViT-B/32's embedding within cosine 0.9999 of the exact path (benchmarks/draft_fidelity.py), and it cuts the
    # resize work 4x compared with stopping at 2*S, which matters when decoding competes with the encoder.
    fast: bool = True
    resize_mode: str = "shortest"  # one of RESIZE_MODES
    interpolation: str = "bicubic"  # a key of INTERPOLATIONS: the resampling filter of the resize

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {tuple(INTERPOLATIONS)}, got {self.interpolation!r}")

    @classmethod
    def from_config(cls, config: Any, fast: bool = True) -> Preprocess:
        """The preprocessing a `CLIPConfig` expects: its resolution, and its family's normalisation and resize."""
        family = getattr(config, "family", "clip")
        if family == "siglip":
            return cls(config.vision.image_size, SIGLIP_MEAN, SIGLIP_STD, fast=fast, resize_mode="squash")
        if family == "mobileclip":  # open_clip's MobileCLIP2-S0/S2 pretrained config
            return cls(config.vision.image_size, MOBILECLIP_MEAN, MOBILECLIP_STD, fast=fast, interpolation="bilinear")
        return cls(image_size=config.vision.image_size, fast=fast)

    @classmethod
    def from_info(cls, info: Any) -> Preprocess:
        """The preprocessing a model's identity (`ModelInfo`) records: what `load_model` returns beside that model,
        known without loading it."""
        return cls(
            image_size=info.image_size,
            mean=tuple(info.mean),
            std=tuple(info.std),
            resize_mode=info.resize_mode,
            interpolation=info.interpolation,
        )

    def __call__(self, image: Image.Image | str | Path) -> torch.Tensor:
        """Decode (for a path) and transform one image."""
        if not isinstance(image, Image.Image):
            image = open_image(image)
        return self.transform(self.decode(image))

    def decode(
        self, image: Image.Image, max_megapixels: float | None = 100.0, min_size: int | None = None
    ) -> Image.Image:
        """Upright RGB, drafted to no less than `min_size` (default S) on the shorter side when `fast`; sub-views
        (`retrieval.views`) ask for more, so each crop still has S pixels across."""
        return to_rgb(
            image, min_size=(min_size or self.image_size) if self.fast else None, max_megapixels=max_megapixels
        )

    def transform(self, image: Image.Image) -> torch.Tensor:
        """`transform_array` as a float32 tensor [3, S, S]."""
        import torch

        return torch.from_numpy(self.transform_array(image))

    def transform_array(self, image: Image.Image) -> np.ndarray:
        """Resize the shorter side to S (bicubic, or `interpolation`), centre crop S x S, scale to [0, 1], normalise:
        float32 [3, S, S], without torch (`normalize(crop_array(image))`).

        With `resize_mode="squash"`, both sides are resized to S and nothing is cropped.
        """
        return self.normalize(self.crop_array(image))

    def crop_array(self, image: Image.Image) -> np.ndarray:
        """The first half of `transform_array`: the image resized and cropped to S x S, as uint8 RGB [S, S, 3].

        A quarter of the bytes of the model's float32 input: what decoder workers hand the encoder, which
        `normalize`s a whole batch at once.
        """
        resample = INTERPOLATIONS[self.interpolation]
        size = self.image_size
        width, height = image.size
        if self.resize_mode == "squash":
            new_size = (size, size)
        elif width <= height:
            new_size = (size, int(size * height / width))
        else:
            new_size = (int(size * width / height), size)
        # round() half-to-even, as torchvision's centre crop does
        top, left = int(round((new_size[1] - size) / 2.0)), int(round((new_size[0] - size) / 2.0))
        if new_size[0] * new_size[1] > _RESIZE_BUDGET * size * size:
            image = _resize_crop(image, new_size, (left, top), size, resample)
        else:
            if new_size != image.size:
                image = image.resize(new_size, resample)
            image = image.crop((left, top, left + size, top + size))
        if image.mode != "RGB":
            image = image.convert("RGB")
        return np.asarray(image, dtype=np.uint8)  # [S, S, 3]

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """The second half of `transform_array`: uint8 RGB [..., S, S, 3] (`crop_array`, or a stack of them) scaled
        to [0, 1] and normalised, as float32 [..., 3, S, S]."""
        # Each step rounds to float32 as torch's div/sub_/div_ did, so the values are the same to the bit.
        out = np.moveaxis(pixels, -1, -3).astype(np.float32, order="C")  # [..., 3, S, S]
        out /= np.float32(255)
        out -= np.asarray(self.mean, dtype=np.float32).reshape(3, 1, 1)
        out /= np.asarray(self.std, dtype=np.float32).reshape(3, 1, 1)
        return out
