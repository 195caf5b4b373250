"""What an index run reports (`IndexSummary`) and what it records in its table's state file (`record_run`).

Free of heavy imports: a run that finds nothing to do (`indexer.unchanged`) reports and records itself without
torch, LanceDB or the model, exactly as a full run (`indexer.pipeline`) does.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from indexer.sync import is_under
from retrieval.store_state import Failure, StoreState

# The stages a run's time is split into (`IndexSummary.stage_seconds`).
STAGES = ("scan", "read", "decode", "transform", "wait", "encode", "write", "ann")


@dataclass
class IndexSummary:
    """What a run did. `indexed` counts files written with a vector (new, changed, and copies of known
    content); `encoded` counts images that went through the model; `failed` counts files that failed in this run
    (listed in `failures`), `failed_unchanged` earlier failures skipped because their file has not changed."""

    found: int = 0
    indexed: int = 0
    unchanged: int = 0
    moved: int = 0
    removed: int = 0
    failed: int = 0
    failed_unchanged: int = 0
    new: int = 0
    changed: int = 0
    duplicates: int = 0
    encoded: int = 0
    commits: int = 0
    worker_restarts: int = 0
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    unsupported: dict[str, int] = field(default_factory=dict)  # image files skipped, by extension: nothing decodes them

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, failures as {"path", "stage", "reason"} objects."""
        out = dataclasses.asdict(self)
        out["failures"] = [f.to_dict() for f in self.failures]
        out["files_per_second"] = round((self.indexed + self.moved) / self.seconds, 2) if self.seconds else 0.0
        return out


def record_run(
    state_file: StoreState,
    summary: IndexSummary,
    *,
    run_id: str,
    state: str,
    roots: Sequence[str],
    started: datetime,
    failures: list[Failure],
    failed_unchanged: list[Failure],
    saved: int,
) -> None:
    """Save a run's progress and the table's failure list in its state file.

    Args:
        state_file: the table's state file.
        summary: the run's counts so far.
        run_id: the run's id (its entry is replaced on each call).
        state: "running", "complete" or "interrupted".
        roots: the run's folders, absolute.
        started: when the run started (UTC).
        failures: the files that failed in this run.
        failed_unchanged: earlier failures the run skipped because their file has not changed.
        saved: rows the run has committed.
    """
    current = failures + failed_unchanged
    failing = {f.path for f in current}
    encoded_roots = [os.fsencode(r) for r in roots]
    kept = [  # earlier failures outside this run's folders, or not retried yet
        f
        for f in state_file.failures()
        if f.path not in failing and not (state == "complete" and is_under(os.fsencode(f.path), encoded_roots))
    ]
    counts = {k: v for k, v in summary.to_dict().items() if k not in ("failures", "stage_seconds")}
    run = {
        "run_id": run_id,
        "state": state,
        "pid": os.getpid(),
        "roots": list(roots),
        "started_at": started.isoformat(),
        "updated_at": datetime.now(timezone.utc).isoformat(),
        **counts,
        "failed": len(failures),
        "saved": saved,
    }
    state_file.record(run, kept + current)
