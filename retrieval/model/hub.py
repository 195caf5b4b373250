"""Model files from a Hugging Face-style hub: fetched once per pinned revision, verified, resumable, cached.

A file lives at `{hub}/{repo}/resolve/{revision}/{file}` (`hub` is `$CLIPSEARCH_HUB_URL`, else
https://huggingface.co). Before fetching, a HEAD request without following redirects reads what the hub
says about the file: for large (LFS) files a redirect to their storage and `X-Linked-Etag`, their SHA-256;
for small files an `ETag` that is their git blob SHA-1. A file is accepted only if it matches the SHA-256
pinned in the registry or, when none is pinned, the hash the hub announced. It is streamed into
`<file>.part` beside its final place, continued with an HTTP Range request after an interruption, and renamed
into place once verified; `.verified.json` in the folder remembers the SHA-256 of every verified file, so later
loads only compare it with the (memoised) hash of the file on disk.
"""

from __future__ import annotations

import fcntl
import hashlib
import http.client
import json
import logging
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import NamedTuple

from retrieval.errors import ModelDownloadError
from retrieval.model.download import (
    CHUNK_BYTES,
    TIMEOUT_SECONDS,
    _reason,
    _remember_hash,
    cache_dir,
    copy_response,
    file_sha256,
)
from retrieval.model.registry import ModelSpec

logger = logging.getLogger(__name__)

HUB_URL_ENV = "CLIPSEARCH_HUB_URL"
DEFAULT_HUB_URL = "https://huggingface.co"
_VERIFIED = ".verified.json"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHA1 = re.compile(r"[0-9a-f]{40}")
_MAX_HUB_HOPS = 5


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Report redirects instead of following them: the hub's headers are on the redirect itself."""

    def redirect_request(self, *args, **kwargs):  # noqa: ANN002, ANN003
        return None


_head_opener = urllib.request.build_opener(_NoRedirect)


class _FileMeta(NamedTuple):
    """What the hub says about one file before it is fetched."""

    url: str  # where the bytes are (the storage a large file redirects to, else the file's own URL)
    sha256: str | None  # an LFS file's SHA-256 (X-Linked-Etag)
    git_sha1: str | None  # a small file's git blob SHA-1 (its ETag)
    size: int | None


def hub_url() -> str:
    """The hub's base URL: `$CLIPSEARCH_HUB_URL`, else https://huggingface.co."""
    return (os.environ.get(HUB_URL_ENV) or DEFAULT_HUB_URL).rstrip("/")


def hub_folder(spec: ModelSpec) -> Path:
    """The cache folder of a hub model's files at its revision (one folder level, "refs/pr/1" -> "refs--pr--1")."""
    return cache_dir() / "hub" / str(spec.hub_repo).replace("/", "--") / spec.revision.replace("/", "--")


def file_url(spec: ModelSpec, filename: str) -> str:
    """The hub URL of one of a model's files at its revision, quoted as huggingface_hub quotes it."""
    return f"{hub_url()}/{spec.hub_repo}/resolve/{urllib.parse.quote(spec.revision, safe='')}/{filename}"


def is_cached(spec: ModelSpec) -> bool:
    """Whether every file of a hub model is in the cache and recorded as verified (no hashing, no network)."""
    folder = hub_folder(spec)
    verified = _read_verified(folder)
    return all((folder / name).is_file() and name in verified for name in spec.files)


def cached_weights_sha256(spec: ModelSpec) -> str | None:
    """The SHA-256 of a hub model's weights file, which `load_model` records as its weights hash, known without
    loading it or asking the hub: when every file is cached and verified and the weights still match their record
    (the file's hash is memoised, so this is cheap); else None.
    """
    from retrieval.model.open_clip_files import find_open_clip_weights

    if not is_cached(spec):
        return None
    folder = hub_folder(spec)
    weights = find_open_clip_weights(folder)
    recorded = _read_verified(folder).get(weights.name) if weights is not None else None
    try:
        return recorded if recorded is not None and file_sha256(weights) == recorded else None
    except OSError:
        return None


def ensure_hub_files(spec: ModelSpec, progress: bool = True) -> Path:
    """The cache folder holding every file of a hub model, verified; missing or damaged files are fetched.

    Args:
        spec: a registry entry with `hub_repo` and `files`.
        progress: show a progress bar on stderr for each download.

    Raises:
        ModelDownloadError: a file cannot be fetched (the message names the files and the folder to put them
            in by hand), or it does not match its hash.
    """
    if spec.hub_repo is None or not spec.files:
        raise ValueError(f"model {spec.name!r} has no hub repository")
    folder = hub_folder(spec)
    pinned = dict(spec.file_sha256)
    for name in spec.files:
        dest = folder / name
        known = _read_verified(folder).get(name)
        if dest.is_file() and known is not None and file_sha256(dest) == known == pinned.get(name, known):
            continue
        if dest.is_file() and known is None:  # put there by hand, e.g. on an offline machine
            sha256 = _check_placed(spec, name, dest, pinned.get(name))
            if sha256 == "unverified":
                continue
            if sha256 is not None:
                _record_verified(folder, name, sha256)
                continue
        if dest.exists():
            logger.warning("%s does not match its verified hash; fetching it again", dest)
        try:
            sha256 = _fetch(spec, name, dest, pinned.get(name), progress)
        except ModelDownloadError as e:
            missing = [n for n in spec.files if not (folder / n).is_file()]
            raise ModelDownloadError(
                f"{e}. To install {spec.name!r} by hand, fetch {', '.join(missing or [name])} from "
                f"{hub_url()}/{spec.hub_repo} (revision {spec.revision}) into {folder}"
            ) from e
        _record_verified(folder, name, sha256)
    return folder


def _check_placed(spec: ModelSpec, name: str, dest: Path, pinned: str | None) -> str | None:
    """Verify a file found in the cache without a record: its SHA-256 if it matches, None if it must be fetched.

    Without a pinned hash the hub is asked for one; when the hub cannot be reached the file is used as placed
    ("unverified", with a warning) and checked again on a later run that can reach it.
    """
    sha256, git_sha1 = _hashes(dest)
    if pinned is not None:
        return sha256 if sha256 == pinned else None
    try:
        meta = _head(file_url(spec, name))
    except ModelDownloadError as e:
        logger.warning("using %s as placed: it cannot be checked against the hub now (%s)", dest, e)
        return "unverified"
    if meta.sha256 is not None:
        return sha256 if sha256 == meta.sha256 else None
    return sha256 if git_sha1 == meta.git_sha1 else None


def _fetch(spec: ModelSpec, name: str, dest: Path, pinned: str | None, progress: bool) -> str:
    """Download one file to dest through `<dest>.part`, resuming it; returns the verified SHA-256."""
    url = file_url(spec, name)
    meta = _head(url)
    if pinned is None and meta.sha256 is None and meta.git_sha1 is None:
        raise ModelDownloadError(f"the hub sent no hash for {url}, so it cannot be verified; pin its SHA-256")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    with part.open("ab") as out:
        fcntl.flock(out, fcntl.LOCK_EX)  # another process fetching the same file waits, then resumes or finds it
        _download(meta, url, part, out, dest.name, progress)
        sha256, git_sha1 = _hashes(part)
        expected = pinned or meta.sha256
        if (expected is not None and sha256 != expected) or (expected is None and git_sha1 != meta.git_sha1):
            part.unlink(missing_ok=True)
            raise ModelDownloadError(
                f"downloaded {url} but it does not match its hash (SHA-256 {sha256}, expected "
                f"{expected or 'git SHA-1 ' + str(meta.git_sha1)}); nothing was kept, try again later"
            )
        os.replace(part, dest)
    _remember_hash(dest, sha256)
    logger.info("downloaded %s to %s", url, dest)
    return sha256


def _head(url: str) -> _FileMeta:
    """Ask the hub about a file without fetching it.

    A redirect to another host (a large file's storage) is not followed: its headers are the hub's answer. A
    redirect within the hub that carries no hash (the hub resolving a branch or a renamed repository) is
    followed, as huggingface_hub does, up to a few hops.
    """
    for _ in range(_MAX_HUB_HOPS):
        request = urllib.request.Request(url, method="HEAD", headers={"Accept-Encoding": "identity"})
        try:
            response = _head_opener.open(request, timeout=TIMEOUT_SECONDS)
        except urllib.error.HTTPError as e:
            if e.code not in (301, 302, 303, 307, 308):
                raise _fetch_error(url, e) from e
            response = e  # a redirect
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            raise _fetch_error(url, e) from e
        with response:
            headers = response.headers
            location = headers.get("Location")
            linked = _unquote(headers.get("X-Linked-Etag") or "")
            etag = _unquote(headers.get("ETag") or "")
            size = headers.get("X-Linked-Size") or headers.get("Content-Length")
        target = urllib.parse.urljoin(url, location) if location else url
        same_host = urllib.parse.urlsplit(target).netloc == urllib.parse.urlsplit(url).netloc
        if location and same_host and not linked and not etag:
            url = target
            continue
        return _FileMeta(
            url=target,
            sha256=linked if _SHA256.fullmatch(linked) else (etag if _SHA256.fullmatch(etag) else None),
            git_sha1=etag if _SHA1.fullmatch(etag) else None,
            size=int(size) if size and size.isdigit() else None,
        )
    raise _fetch_error(url, OSError(f"more than {_MAX_HUB_HOPS} redirects"))


def _download(meta: _FileMeta, url: str, part: Path, out, label: str, progress: bool) -> None:  # noqa: ANN001
    """Append the rest of the file to `part` (opened as `out`), asking only for the bytes still missing."""
    have = part.stat().st_size
    if meta.size is not None and have >= meta.size:
        return  # complete already (or longer than announced: the hash check decides)
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        with urllib.request.urlopen(urllib.request.Request(meta.url, headers=headers), timeout=TIMEOUT_SECONDS) as r:
            if have and r.status != 206:  # the server ignored the range: start over
                out.truncate(0)
                out.seek(0)
                have = 0
            copy_response(r, out, label, meta.size, initial=have, progress=progress)
            out.flush()
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        out.flush()
        raise _fetch_error(url, e, resumable=part.stat().st_size > 0) from e
    if meta.size is not None and part.stat().st_size < meta.size:
        raise _fetch_error(url, OSError(f"got {part.stat().st_size} of {meta.size} bytes"), resumable=True)


def _hashes(path: Path) -> tuple[str, str]:
    """A file's SHA-256 and its git blob SHA-1 (what the hub's ETag of a small file is)."""
    sha256 = hashlib.sha256()
    git_sha1 = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            sha256.update(chunk)
            git_sha1.update(chunk)
    return sha256.hexdigest(), git_sha1.hexdigest()


def _fetch_error(url: str, error: BaseException, resumable: bool = False) -> ModelDownloadError:
    """A one-line error for a failed request."""
    again = "; run the same command again to resume" if resumable else ""
    return ModelDownloadError(f"cannot download {url} ({_reason(error)}){again}")


def _unquote(etag: str) -> str:
    """An ETag without its weak marker and quotes, lowercased."""
    return etag.removeprefix("W/").strip('"').lower()


def _read_verified(folder: Path) -> dict[str, str]:
    """The verified files' SHA-256s recorded in a hub folder."""
    try:
        data = json.loads((folder / _VERIFIED).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _record_verified(folder: Path, name: str, sha256: str) -> None:
    """Remember that a file was verified (written atomically)."""
    verified = _read_verified(folder)
    verified[name] = sha256
    tmp = folder / f"{_VERIFIED}.{os.getpid()}.part"
    tmp.write_text(json.dumps(verified, indent=1) + "\n")
    os.replace(tmp, folder / _VERIFIED)
