"""Typed errors. Each message says what went wrong and how to fix it; only the CLI turns them into exit codes."""

from __future__ import annotations

import errno
import os
import re


class ClipsearchError(Exception):
    """Base class of every error clipsearch raises on purpose."""


class UnknownModelError(ClipsearchError, KeyError):
    """A model name that is not in the registry."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ModelDownloadError(ClipsearchError):
    """Weights could not be fetched (offline, HTTP error, checksum mismatch)."""


class CheckpointError(ClipsearchError):
    """A checkpoint file or folder that cannot be read or does not fit the model."""


class TokenizerError(ClipsearchError, ValueError):
    """Text that cannot be tokenized as asked (e.g. too long without truncation)."""


class ImageLoadError(ClipsearchError):
    """An image file that cannot be opened or decoded."""


class StoreError(ClipsearchError):
    """The LanceDB store is missing, locked, corrupt or of an unknown schema."""


class ModelMismatchError(StoreError):
    """A store built with one model used with another."""


class QueryError(ClipsearchError, ValueError):
    """A query that cannot be run as written."""


class TrainingError(ClipsearchError):
    """Training cannot start or resume as asked (bad data, an output folder holding another run)."""


class StoreWriteError(StoreError):
    """The store's directory cannot be written: its disk is full, it is mounted read-only, or it is not ours."""

    @classmethod
    def from_error(cls, where: str | os.PathLike[str], error: BaseException) -> StoreWriteError | None:
        """The error to raise for a failed write under `where`, saying what to do: one for any OSError, and for
        LanceDB's RuntimeError naming an "os error N"; None for other errors."""
        if isinstance(error, OSError):
            code = error.errno
        else:
            found = re.search(r"\(os error (\d+)\)", str(error))
            if found is None:
                return None
            code = int(found.group(1))
        if code in (errno.ENOSPC, errno.EDQUOT):
            fix = "free some space on its disk"
        elif code == errno.EROFS:
            fix = "mount it read-write (or use another --db)"
        elif code in (errno.EACCES, errno.EPERM):
            fix = "make it writable for this user (or use another --db)"
        else:
            fix = "check its disk"
        reason = os.strerror(code) if code is not None else str(error)
        return cls(
            f"cannot write to the store at {os.fspath(where)} ({reason}); {fix}, then run the same command again "
            "to carry on"
        )


class StoreLockedError(StoreError):
    """Another process is writing to the same store table (a second `clipsearch index`)."""


class DatasetError(ClipsearchError, ValueError):
    """An evaluation set (captioned or labelled) that cannot be read as given."""


class IndexingError(ClipsearchError):
    """An index run that cannot go on (not a bad file: those are recorded and skipped)."""


class NotFoundError(ClipsearchError, LookupError):
    """A stored image, its file or an upload that is not (or no longer) there."""

    def __str__(self) -> str:  # LookupError's KeyError cousins would repr() the message
        return str(self.args[0]) if self.args else ""


class ExportError(ClipsearchError):
    """An ONNX export of a model's encoders that cannot be made, or is missing or stale where it is needed."""
