"""The download cache: fetch a registry model's weights once, verify their SHA-256, and keep them.

A download streams into a temporary file next to its final place and is renamed into place only once its
checksum matches, so an interrupted or corrupt download never leaves a file under the final name. File
hashes are remembered per (size, mtime, inode), so a 350 MB checkpoint is hashed once, not on every load,
while a file that was modified in any way is hashed (and so verified) again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

from retrieval.errors import ModelDownloadError
from retrieval.model.registry import ModelSpec

logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
TIMEOUT_SECONDS = 30.0
_HASHES_FILE = "file-hashes.json"


def cache_dir() -> Path:
    """Where downloaded weights live: `$CLIPSEARCH_CACHE`, else ~/.cache/clipsearch."""
    return Path(os.environ.get("CLIPSEARCH_CACHE") or Path.home() / ".cache" / "clipsearch").expanduser()


def cached_path(spec: ModelSpec) -> Path:
    """The path a registry model's downloaded file has (or will have) in the cache."""
    return cache_dir() / spec.filename


def copy_response(
    response: BinaryIO,
    out: BinaryIO,
    label: str,
    total: int | None,
    initial: int = 0,
    progress: bool = True,
    digest: Any = None,
) -> int:
    """Stream an HTTP response into `out` in chunks, with a progress bar on stderr, feeding `digest` (a hashlib
    object) if given. `initial` bytes are already there (a resumed download). Returns the bytes copied."""
    from tqdm import tqdm  # here: `cache_dir` and `file_sha256` serve one-shot queries, which never show a bar

    copied = 0
    with tqdm(
        total=total,
        initial=initial,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=f"downloading {label}",
        disable=not progress,
        file=sys.stderr,
    ) as bar:
        while chunk := response.read(CHUNK_BYTES):
            out.write(chunk)
            if digest is not None:
                digest.update(chunk)
            copied += len(chunk)
            bar.update(len(chunk))
    return copied


def ensure_downloaded(spec: ModelSpec, progress: bool = True) -> Path:
    """The verified local file of a downloadable registry model, fetching it when missing or corrupt.

    Args:
        spec: a registry entry with `url` and `sha256`.
        progress: show a tqdm bar on stderr while downloading.

    Returns:
        The file's path in the cache dir.

    Raises:
        ModelDownloadError: offline, HTTP error, or the download does not match the expected SHA-256.
    """
    if spec.url is None or spec.sha256 is None:
        raise ValueError(f"model {spec.name!r} is not downloadable")
    dest = cached_path(spec)
    if dest.is_file():
        if file_sha256(dest) == spec.sha256:
            return dest
        logger.warning("%s does not match the SHA-256 of %s; downloading it again", dest, spec.name)
    elif dest.exists():
        raise ModelDownloadError(f"{dest} is in the way of model {spec.name!r} but is not a file; remove it")
    return download(spec.url, dest, spec.sha256, progress=progress)


def download(url: str, dest: Path, sha256: str, progress: bool = True) -> Path:
    """Fetch url into dest atomically, checking its SHA-256 on the way.

    Args:
        url: the http(s) URL.
        dest: the final path; its folder is created if needed.
        sha256: the expected hex digest of the whole file.
        progress: show a tqdm bar on stderr.

    Returns:
        dest.

    Raises:
        ModelDownloadError: the URL cannot be fetched (the message names the URL and where to put the file by
            hand) or the bytes do not match sha256. No partial file is left behind either way.
    """
    import http.client  # here: every model load hashes files with this module, few download (~0.05 s to import)
    import urllib.request

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response:
                    total = int(response.headers.get("Content-Length") or 0) or None
                    received = copy_response(response, out, dest.name, total, progress=progress, digest=digest)
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
                raise _fetch_error(url, dest, _reason(e)) from e
        if total is not None and received != total:
            raise _fetch_error(url, dest, f"the connection closed after {received} of {total} bytes")
        got = digest.hexdigest()
        if got != sha256:
            raise ModelDownloadError(
                f"downloaded {url} but its SHA-256 is {got}, not the expected {sha256}; nothing was saved. "
                f"Try again later, or fetch the file by hand and save it as {dest}"
            )
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _remember_hash(dest, got)
    logger.info("downloaded %s to %s", url, dest)
    return dest


def _fetch_error(url: str, dest: Path, reason: str) -> ModelDownloadError:
    """The one-line error for a failed fetch, with where to put the file by hand."""
    return ModelDownloadError(
        f"cannot download {url} ({reason}); if this machine is offline, fetch that URL elsewhere and save it as {dest}"
    )


def _reason(error: BaseException) -> str:
    """A short human reason for a failed request."""
    import urllib.error

    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    return str(error) or type(error).__name__


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, remembered in the cache dir until the file's size, mtime or inode change."""
    path = Path(path).resolve()
    stat = path.stat()
    key = str(path)
    stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
    entry = _read_hashes().get(key)
    if entry is not None and entry.get("stamp") == stamp:
        return str(entry["sha256"])
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    _remember_hash(path, digest.hexdigest(), stamp)
    return digest.hexdigest()


def _read_hashes() -> dict[str, dict]:
    """The remembered file hashes; empty when the file is missing or unreadable."""
    try:
        data = json.loads((cache_dir() / _HASHES_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _remember_hash(path: Path, sha256: str, stamp: list[int] | None = None) -> None:
    """Record a file's hash; a read-only cache dir only costs re-hashing later."""
    path = Path(path).resolve()
    if stamp is None:
        stat = path.stat()
        stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
    hashes = _read_hashes()
    hashes[str(path)] = {"stamp": stamp, "sha256": sha256}
    target = cache_dir() / _HASHES_FILE
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{_HASHES_FILE}.", suffix=".part")
    except OSError as e:
        logger.debug("cannot record the hash of %s: %s", path, e)
        return
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(hashes, f)
        os.replace(tmp_name, target)
    except OSError as e:
        logger.debug("cannot record the hash of %s: %s", path, e)
        Path(tmp_name).unlink(missing_ok=True)
