"""What a decoder worker does with one file: read, hash, decode, preprocess, fingerprint, and read the EXIF metadata.

`Decoder` is a picklable callable (it runs in worker processes) that never raises for a bad file: every
problem comes back as a `Failed` result naming the stage. When the file's hash matches content the store
already has (`Decoder.known`), it stops before decoding: the vector can be reused.

What the image libraries say while decoding a file (Python warnings from Pillow, and the lines libtiff and
other C libraries write straight to the process's stderr) comes back with the result as `notes`, which the
indexer logs at debug level, instead of reaching the terminal.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import IO, NamedTuple

import numpy as np
from PIL import ExifTags, Image, ImageFile, UnidentifiedImageError

from indexer.formats import register_plugins
from retrieval.catalog import hash_key
from retrieval.errors import ImageLoadError
from retrieval.fingerprint import fingerprint
from retrieval.model.preprocess import Preprocess, decode_error_reason
from retrieval.regions import crop, view_boxes, views_min_size
from retrieval.types import ImageMetadata

register_plugins()  # HEIC, AVIF, JPEG XL when their plugins are installed: the walker lists such files only then

_ORIENTATION_SWAPS = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees
# Library messages kept per file: a damaged TIFF can make libtiff complain about every strip and Pillow warn about
# every tag. With --workers 0 and -vv, Pillow's own debug log lines (~40 for a TIFF) are among them.
_MAX_NOTES = 200
_MAX_NOTE_BYTES = 64 * 1024  # of what was written to stderr, read back per file


class DecodeTask(NamedTuple):
    """One file to decode."""

    path: str
    check_known: bool = False  # the store has files of this size: stop early if the content is known


class Decoded(NamedTuple):
    """A decoded, preprocessed image."""

    pixels: np.ndarray  # [S, S, 3] uint8, resized and cropped (`Preprocess.crop_array`); `normalize` does the rest
    metadata: ImageMetadata
    seconds: tuple[float, float, float]  # time spent reading (+hashing), decoding, transforming
    notes: tuple[str, ...] = ()  # what the image libraries said while decoding it
    views: np.ndarray | None = None  # [V, S, S, 3] uint8, the sub-views (`retrieval.views.view_boxes`), when asked for


class Known(NamedTuple):
    """The file's content is already in the store: no decoding needed."""

    content_hash: str
    seconds: tuple[float, float, float]


class Failed(NamedTuple):
    """A file that cannot be indexed."""

    stage: str  # read, decode, preprocess, worker
    reason: str
    notes: tuple[str, ...] = ()  # what the image libraries said while decoding it


DecodeResult = Decoded | Known | Failed


@dataclass(frozen=True)
class Decoder:
    """Turns a `DecodeTask` into a `DecodeResult`; runs in decoder worker processes, so it is picklable.

    Args:
        preprocess: the model's preprocessing (its `decode` drafts large JPEGs, its `transform` is CLIP's).
        max_megapixels: images larger than this (after JPEG draft) are refused as decompression bombs.
        known: sorted `hash_key`s of content the store already has; such files are not decoded.
        views: sub-views to cut from the decoded image as well (`retrieval.views.view_boxes`); 0 for none.
    """

    preprocess: Preprocess
    max_megapixels: float = 100.0
    known: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64), compare=False)  # sorted hash_keys
    views: int = 0

    def __call__(self, task: DecodeTask) -> DecodeResult:
        """Read, hash, decode and transform one file; every problem becomes a `Failed`."""
        start = time.perf_counter()
        try:
            data = read_bytes(task.path)
        except FileNotFoundError:
            return Failed("read", "the file vanished during the run")
        except OSError as e:
            return Failed("read", f"cannot read ({e.strerror or e})")
        if not data:
            return Failed("read", "empty file (0 bytes)")
        content_hash = hashlib.sha256(data).hexdigest()
        read_done = time.perf_counter()
        if task.check_known and _contains(self.known, hash_key(content_hash)):
            return Known(content_hash, (read_done - start, 0.0, 0.0))
        notes: list[str] = []
        with _refusing_truncated_data(), _library_output(notes):
            result = self._decode(data, content_hash, read_done - start)
        return result._replace(notes=tuple(notes)) if notes else result

    def _decode(self, data: bytes, content_hash: str, read_seconds: float) -> Decoded | Failed:
        """Decode, read the metadata and transform; every problem becomes a `Failed`."""
        start = time.perf_counter()
        try:
            image = Image.open(io.BytesIO(data))
            stored_size = image.size  # before a JPEG draft shrinks it
            # Decode before reading the metadata: reading a PNG's EXIF loads the pixels, and a load failing there
            # (its error swallowed, as EXIF damage only costs the metadata) would leave a half-decoded image that
            # the next load returns without complaint.
            # one decode for the whole image and its views: drafted only as far as the views' crops allow
            min_size = views_min_size(self.views, self.preprocess.image_size) if self.views else None
            rgb = self.preprocess.decode(image, max_megapixels=self.max_megapixels, min_size=min_size)
            metadata = _metadata(image, stored_size, content_hash)
        except UnidentifiedImageError:
            return Failed("decode", "not an image Pillow can read")
        except ImageLoadError as e:
            return Failed("decode", str(e).removeprefix("<image>: "))
        except Exception as e:  # Pillow's plugins raise many types on damaged files (RuntimeError from AVIF ...)
            return Failed("decode", decode_error_reason(e))
        decode_done = time.perf_counter()
        try:
            # uint8: a quarter of the bytes of the float32 input to send to the encoder, which normalises a batch
            pixels = self.preprocess.crop_array(rgb)
            metadata = metadata._replace(fingerprint=fingerprint(rgb))
            views = None
            if self.views:
                views = np.stack([self.preprocess.crop_array(crop(rgb, box)) for box in view_boxes(self.views)])
        except (OSError, ValueError) as e:
            return Failed("preprocess", f"cannot transform ({e})")
        seconds = (read_seconds, decode_done - start, time.perf_counter() - decode_done)
        return Decoded(pixels, metadata, seconds, views=views)


def read_bytes(path: str) -> bytes:
    """The bytes of a local file, or of an object-store URI (`s3://bucket/key`) through pyarrow's file systems.

    Raises:
        FileNotFoundError: there is no such file.
        OSError: it cannot be read.
    """
    if "://" not in path:
        with open(path, "rb") as f:
            return f.read()
    from pyarrow import fs

    try:
        filesystem, inner = fs.FileSystem.from_uri(path)
    except ValueError as e:
        raise OSError(f"unknown file system ({e})") from e
    with filesystem.open_input_stream(inner) as f:  # raises FileNotFoundError / OSError like open()
        return f.read()


@contextlib.contextmanager
def _refusing_truncated_data() -> Iterator[None]:
    """Pillow's process-wide `LOAD_TRUNCATED_IMAGES` off for the duration: an application that turned it on for its
    own use must not make the indexer store a truncated file as a partly grey image."""
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


_capture: tuple[int, IO[bytes]] | None = None  # (pid, file): this process's sink for what libraries print


@contextlib.contextmanager
def _library_output(notes: list[str]) -> Iterator[None]:
    """Collect into `notes` what the image libraries say for the duration: Pillow's Python warnings, and what C
    libraries (libtiff above all) write to file descriptor 2, which would otherwise flood the terminal with hundreds
    of lines a run, even under --json.

    File descriptor 2 is the whole process's: while it points at the sink, whatever else is written to stderr lands
    in the notes too. Decoder workers do nothing else; with --workers 0 the main thread is decoding, and what it
    logs meanwhile (Pillow's debug lines under -vv) is logged again with the file's path.
    """
    global _capture
    if _capture is None or _capture[0] != os.getpid():  # a file of our own per process, also after a fork
        _capture = (os.getpid(), tempfile.TemporaryFile())
    sink = _capture[1]
    try:
        saved: int | None = os.dup(2)
    except OSError:  # no stderr to divert
        saved = None
    if saved is not None:
        _flush_stderr()  # what Python printed before belongs on the terminal
        os.dup2(sink.fileno(), 2)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        if saved is not None:
            _flush_stderr()  # ... and what it printed since, in the notes
            os.dup2(saved, 2)
            os.close(saved)
        notes.extend(f"{w.category.__name__}: {w.message}" for w in caught)
        sink.seek(0)
        printed = sink.read(_MAX_NOTE_BYTES).decode("utf-8", "replace")
        sink.seek(0)
        sink.truncate()
        notes.extend(line.strip() for line in printed.splitlines() if line.strip())
        if len(notes) > _MAX_NOTES:  # the first and the last say most: what went wrong first, and the final error
            half = _MAX_NOTES // 2
            notes[half:-half] = [f"... {len(notes) - 2 * half} more messages ..."]


def _flush_stderr() -> None:
    """Flush Python's buffered stderr, if there is one (pythonw has none)."""
    with contextlib.suppress(AttributeError, OSError, ValueError):
        sys.stderr.flush()


def _contains(sorted_keys: np.ndarray, key: np.uint64) -> bool:
    """Membership in a sorted uint64 array."""
    i = int(np.searchsorted(sorted_keys, key))
    return i < len(sorted_keys) and sorted_keys[i] == key


def _metadata(image: Image.Image, size: tuple[int, int], content_hash: str) -> ImageMetadata:
    """Size as displayed (`size` as stored, EXIF orientation applied), format, and EXIF capture time and camera."""
    width, height = size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about malformed EXIF it then skips
        try:
            exif = image.getexif()
            sub = exif.get_ifd(ExifTags.IFD.Exif)
        except Exception:  # any EXIF damage only costs the metadata, never the image
            exif, sub = {}, {}
    if exif.get(ExifTags.Base.Orientation) in _ORIENTATION_SWAPS:
        width, height = height, width
    taken = sub.get(ExifTags.Base.DateTimeOriginal) or sub.get(ExifTags.Base.DateTimeDigitized)
    return ImageMetadata(
        content_hash=content_hash,
        width=width,
        height=height,
        format=image.format,
        taken_at=_exif_datetime(taken),
        camera_make=_exif_text(exif.get(ExifTags.Base.Make)),
        camera_model=_exif_text(exif.get(ExifTags.Base.Model)),
    )


def _exif_text(value: object) -> str | None:
    """An EXIF ASCII value without padding, or None when empty or not text."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    value = value.replace("\x00", "").strip()
    return value or None


def _exif_datetime(value: object) -> datetime | None:
    """Parse EXIF's "YYYY:MM:DD HH:MM:SS"; None for blanks ("    :  :  ") or impossible dates."""
    text = _exif_text(value)
    if not text:
        return None
    try:
        return datetime.strptime(text[:19], "%Y:%m:%d %H:%M:%S")
    except ValueError:
        return None
