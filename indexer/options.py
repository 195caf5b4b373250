"""The settings of an index run. Kept free of heavy imports: the CLI reads the defaults for its help text."""

from __future__ import annotations

from dataclasses import dataclass, field

from retrieval.cores import available_cores


def default_workers() -> int:
    """One decoder process per core, at most 8. While a batch is encoded on the CPU by torch they pause (it uses
    every core); in between they have every core. Beside ONNX Runtime or a GPU encoder they decode all the time, at
    a lower priority than the encoder."""
    return max(1, min(available_cores(), 8))


@dataclass(frozen=True)
class IndexOptions:
    """How to run an index pass."""

    workers: int = field(default_factory=default_workers)  # decoder processes; 0 decodes in this process
    batch_size: int = 32  # images per encoder call
    max_megapixels: float = 100.0  # larger images are refused as decompression bombs
    exclude: tuple[str, ...] = ()  # glob patterns of files/folders to skip
    commit_every: int = 256  # rows per store commit at most ...
    commit_seconds: float = 10.0  # ... and seconds between commits at most
    decode_timeout: float = 120.0  # seconds one file may take to decode before its worker is replaced
    lock_wait: float = 10.0  # seconds to wait for another indexer on the same table
    retry_failed: bool = False  # read files that failed before even when they have not changed since
    progress: bool = True  # a tqdm bar on stderr
    views: int | None = None  # sub-views per image (0, 5, 10, ...: retrieval.views); None: as the store was indexed
