"""Which files are images to index: the formats the installed Pillow and its plugins decode, by file extension.

The list comes from Pillow itself (`Image.registered_extensions()`), so `.mpo`, `.jp2`, `.psd`, `.tga`, `.ppm`,
`.ico`, `.apng`, `.jfif` and the rest are read as soon as Pillow reads them, and HEIC or JPEG XL as soon as their
plugin is installed. Image files that nothing installed can decode (`.svg`, camera raw, `.heic` without the
plugin) are counted, so a run can say what it skipped and what would read them.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping

from PIL import Image, ImageFile


def register_plugins() -> None:
    """Let Pillow open the formats of the plugins that are installed (HEIC/HEIF, AVIF, JPEG XL)."""
    try:
        from pillow_heif import register_heif_opener

        register_heif_opener()
    except ImportError:
        pass
    for module in ("pillow_avif", "pillow_jxl"):  # these register themselves when imported
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
    factory = Image.OPEN.get(_OPENED_AS.get(format_id, format_id), (None,))[0]
    if factory is None or format_id in _NOT_DECODED:
        return False
    return not (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile))


@functools.cache
def supported_extensions() -> frozenset[str]:
    """Extensions (lower case, with the dot) of the image formats the installed Pillow and plugins decode.

    Worked out on first use, not on import: it imports every Pillow plugin, and the decoder workers' server, which
    imports `indexer.decode` (and so this module) before forking them, starts its workers markedly slower for it.
    """
    register_plugins()
    Image.init()
    return frozenset(ext.lower() for ext, format_id in Image.registered_extensions().items() if _decodes(format_id))


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
