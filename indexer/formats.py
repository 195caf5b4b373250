"""Which files are images to index: the formats the installed Pillow and its plugins decode, by file extension.

The list comes from Pillow itself (`Image.registered_extensions()`), so `.mpo`, `.jp2`, `.psd`, `.tga`, `.ppm`,
`.ico`, `.apng`, `.jfif` and the rest are read as soon as Pillow reads them, and HEIC or JPEG XL as soon as their
plugin is installed. Image files that nothing installed can decode (`.svg`, camera raw, `.heic` without the
plugin) are counted, so a run can say what it skipped and what would read them.

Asking Pillow means importing every one of its plugins (~0.1-0.3 s), which would be most of the start-up of an index
run that finds nothing to do; so the answer is remembered in the cache dir for as long as Pillow, the plugins and
this module are the files they were when it was worked out.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from typing import Any

from retrieval.model.download import cache_dir

logger = logging.getLogger(__name__)

_REMEMBERED_FILE = "image-extensions.json"
_PLUGINS = ("pillow_heif", "pillow_avif", "pillow_jxl")


def register_plugins() -> None:
    """Let Pillow open the formats of the plugins that are installed (HEIC/HEIF, AVIF, JPEG XL)."""
    try:
        from pillow_heif import register_heif_opener

        register_heif_opener()
    except ImportError:
        pass
    for module in _PLUGINS[1:]:  # these register themselves when imported
        try:
            __import__(module)
        except ImportError:
            pass


# Formats Pillow opens that the indexer does not decode: PostScript is a program, which Pillow hands to Ghostscript
# (when installed) to render, and an MPEG video only has its header read. Pillow's stub formats (BUFR, GRIB, HDF5,
# WMF) need a decoder the application registers, and are left out too.
_NOT_DECODED = frozenset({"EPS", "MPEG"})


# Formats Pillow opens through another format's plugin: multi-picture JPEGs (.mpo) are JPEGs to it at first.
_OPENED_AS = {"MPO": "JPEG"}


def _decodes(format_id: str) -> bool:
    """Whether Pillow decodes this registered format by itself (PDF and Palm are write-only, for a start)."""
    from PIL import Image, ImageFile

    factory = Image.OPEN.get(_OPENED_AS.get(format_id, format_id), (None,))[0]
    if factory is None or format_id in _NOT_DECODED:
        return False
    return not (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile))


@functools.cache
def supported_extensions() -> frozenset[str]:
    """Extensions (lower case, with the dot) of the image formats the installed Pillow and plugins decode.

    Worked out on first use, not on import: it imports every Pillow plugin, and the decoder workers' server, which
    imports `indexer.decode` (and so this module) before forking them, starts its workers markedly slower for it.
    Remembered in the cache dir (`_installation` says for which files), so later processes do not import Pillow.
    """
    installation = _installation()
    remembered = _remembered(installation)
    if remembered is not None:
        return remembered
    from PIL import Image

    register_plugins()
    Image.init()
    found = frozenset(ext.lower() for ext, format_id in Image.registered_extensions().items() if _decodes(format_id))
    _remember(installation, found)
    return found


def _installation() -> list[Any]:
    """What the extensions depend on: this module, Pillow and each plugin, by file, size and mtime (an upgrade,
    an install or a removal changes it), found without importing them."""
    parts: list[Any] = []
    for name in (__name__, "PIL", *_PLUGINS):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):  # ValueError: a module put in sys.modules without a spec
            spec = None
        origin = spec.origin if spec is not None else None
        try:
            stat = os.stat(origin) if origin else None
        except OSError:
            stat = None
        parts.append([name, origin, None if stat is None else [stat.st_size, stat.st_mtime_ns, stat.st_ino]])
    return parts


def _remembered(installation: list[Any]) -> frozenset[str] | None:
    """The extensions worked out for this installation before, if the cache dir has them."""
    try:
        data = json.loads((cache_dir() / _REMEMBERED_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("installation") != installation:
        return None
    extensions = data.get("extensions")
    if not isinstance(extensions, list) or not all(isinstance(ext, str) for ext in extensions):
        return None
    return frozenset(extensions)


def _remember(installation: list[Any], extensions: frozenset[str]) -> None:
    """Keep the extensions for later processes; a read-only cache dir only costs them Pillow's import."""
    target = cache_dir() / _REMEMBERED_FILE
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{_REMEMBERED_FILE}.", suffix=".part")
    except OSError as e:
        logger.debug("cannot remember the image extensions in %s: %s", target.parent, e)
        return
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"installation": installation, "extensions": sorted(extensions)}, f)
        os.replace(tmp, target)
    except OSError as e:
        logger.debug("cannot remember the image extensions in %s: %s", target.parent, e)
        with contextlib.suppress(OSError):
            os.unlink(tmp)


# Image formats met in photo folders that nothing installed may read, with what would read them.
_HEIC = "install pillow-heif for HEIC"
_AVIF = "install pillow-avif-plugin for AVIF"
_JXL = "install pillow-jxl-plugin for JPEG XL"
_RAW = (".dng", ".cr2", ".cr3", ".crw", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".orf", ".rw2", ".raf", ".pef",
        ".srw", ".x3f", ".3fr", ".erf", ".kdc", ".mrw", ".rwl", ".iiq", ".raw")  # fmt: skip
_OTHER = (".svg", ".svgz", ".eps", ".ai", ".psb", ".xcf", ".kra", ".exr", ".hdr", ".jxr", ".wdp", ".hdp", ".bpg")
KNOWN_IMAGE_EXTENSIONS: Mapping[str, str | None] = {
    ".heic": _HEIC,
    ".heif": _HEIC,
    ".hif": _HEIC,
    ".avif": _AVIF,
    ".avifs": _AVIF,
    ".jxl": _JXL,
    **dict.fromkeys(_RAW),
    **dict.fromkeys(_OTHER),
}


def unsupported_extension(name: str) -> str | None:
    """The extension of an image file nothing installed decodes (".svg", ".heic" without its plugin), else None."""
    ext = os.path.splitext(name)[1].lower()
    return ext if ext in KNOWN_IMAGE_EXTENSIONS and ext not in supported_extensions() else None


def describe_unsupported(counts: Mapping[str, int]) -> str:
    """One line on skipped files: "3 files skipped as unsupported formats (2 .svg, 1 .heic; install pillow-heif for
    HEIC)"."""
    total = sum(counts.values())
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    hints = dict.fromkeys(hint for ext, _ in ordered if (hint := KNOWN_IMAGE_EXTENSIONS.get(ext)))
    detail = ", ".join(f"{n} {ext}" for ext, n in ordered) + "".join(f"; {hint}" for hint in hints)
    skipped = (
        "1 file skipped as an unsupported format" if total == 1 else f"{total} files skipped as unsupported formats"
    )
    return f"{skipped} ({detail})"
