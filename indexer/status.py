"""What `clipsearch status` reports: per model table, its size, whether an index run is going on, finished
or was interrupted, the FAISS index, the last run and the files that failed. Reads the store only; loads no model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from indexer.lock import IndexLock
from retrieval.ann import index_state
from retrieval.errors import StoreError
from retrieval.store import Store, default_db_dir
from retrieval.views import views_state


def store_status(db_dir: str | os.PathLike[str] | None = None, model: str | None = None) -> dict[str, Any]:
    """The status of every model table in a store (or of the tables recorded under the name `model`).

    Returns:
        {"db": str, "models": [{"model", "table", "count", "version", "state", "indexing_pid", "last_run",
        "ann", "views", "failures"}]}, JSON-able. `state` is "indexing" (a run holds the lock now), "interrupted" (the
        last run did not finish: run `clipsearch index` again to resume), "complete", or "empty" (never
        indexed). `ann` is the FAISS index's state (`retrieval.ann.index_state`);
        `views` None, or the sub-views' {"count", "layout", "index"} (`retrieval.views.views_state`).

    Raises:
        StoreError: there is no store at `db_dir`, or no table for `model`.
    """
    db_dir = Path(db_dir).expanduser() if db_dir is not None else default_db_dir()
    tables = Store.models(db_dir)
    if not tables:
        raise StoreError(f"no image store at {db_dir}; run `clipsearch index FOLDER` first")
    if model is not None:
        tables = [t for t in tables if t.model.name == model]
        if not tables:
            names = ", ".join(sorted({t.model.name for t in Store.models(db_dir)}))
            raise StoreError(f"the store at {db_dir} has no images indexed with model {model!r}; it has: {names}")
    out = []
    for table in tables:
        store = Store.open(db_dir, table.model)
        runs = store.state.runs()
        last = runs[-1] if runs else None
        holder = IndexLock(store.path / f"{store.table_name}.lock").holder()
        if holder is not None:
            state = "indexing"
        elif last is None:
            state = "empty"
        else:
            state = "complete" if last.get("state") == "complete" else "interrupted"
        out.append(
            {
                "model": table.model.to_dict(),
                "table": table.table_name,
                "count": store.count(),
                "version": store.version,
                "state": state,
                "indexing_pid": holder,
                "last_run": last,
                "ann": index_state(store),
                "views": views_state(store),
                "failures": [f.to_dict() for f in store.state.failures()],
            }
        )
    return {"db": str(db_dir.absolute()), "models": out}
