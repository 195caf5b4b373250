"""Where concepts live: a LanceDB table per model beside its image table (`ConceptBook`), `@name` terms resolved
from it, and `tag_concept` writing a concept's yes/no column."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.concepts.concept import NAME_PATTERN, Concept, check_name
from retrieval.errors import ModelMismatchError, QueryError, StoreError
from retrieval.model.identity import ModelInfo
from retrieval.query import Term

if TYPE_CHECKING:
    from retrieval.store import Store

logger = logging.getLogger(__name__)

_PREFIX = "concepts_"


def _schema() -> Any:
    """The Arrow schema of a concept table."""
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("name", pa.string(), nullable=False),
            pa.field("method", pa.string(), nullable=False),
            pa.field("model", pa.string(), nullable=False),  # ModelInfo.to_dict() as JSON
            pa.field("vector", pa.list_(pa.float32()), nullable=False),
            pa.field("bias", pa.float64(), nullable=False),
            pa.field("example_ids", pa.list_(pa.int64()), nullable=False),
            pa.field("negative_ids", pa.list_(pa.int64()), nullable=False),
            pa.field("seed", pa.int64(), nullable=False),
            pa.field("accuracy", pa.float64()),
            pa.field("params", pa.string(), nullable=False),  # JSON
            pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
        ]
    )


def _json_default(value: Any) -> Any:
    """numpy values as JSON."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON-able: {type(value).__name__}")


class ConceptBook:
    """The concepts learned over one model's image table, in the LanceDB table `concepts_<model table>` of the
    same store directory, one row per name.

    Args:
        store: the open image store whose model the concepts belong to.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self.table_name = _PREFIX + store.table_name
        self._table: Any = None

    def _open(self, create: bool = False) -> Any:
        """The concept table, or None when there is none yet (and not `create`)."""
        if self._table is None:
            from retrieval.store import _connect, _table_names

            db = _connect(self.store.path)
            if self.table_name in _table_names(db):
                self._table = db.open_table(self.table_name)
            elif create:
                try:
                    self._table = db.create_table(self.table_name, schema=_schema())
                except (ValueError, OSError):  # created meanwhile by another process
                    self._table = db.open_table(self.table_name)
        return self._table

    def concepts(self) -> list[Concept]:
        """Every concept of this model, by name."""
        table = self._open()
        if table is None:
            return []
        rows = table.search().limit(None).to_arrow().to_pylist()
        return sorted((self._concept(row) for row in rows), key=lambda c: c.name)

    def names(self) -> list[str]:
        """The names of this model's concepts."""
        return [c.name for c in self.concepts()]

    def get(self, name: str) -> Concept:
        """The concept called `name`.

        Raises:
            QueryError: no such concept for this model (the message lists the known ones, and names the models
                of other tables that have one by that name).
            ModelMismatchError: the stored concept was learned with another model's vectors.
        """
        table = self._open()
        rows = [] if table is None else table.search().where(f"name = '{name}'").limit(None).to_arrow().to_pylist()
        if not rows or not NAME_PATTERN.fullmatch(name):
            known = ", ".join(f"@{n}" for n in self.names()) or "none yet"
            elsewhere = self._elsewhere(name)
            hint = f"; @{name} was learned with model {elsewhere}, pass --model {elsewhere}" if elsewhere else ""
            raise QueryError(
                f"unknown concept @{name} for model {self.store.model_info.name!r} (known: {known}){hint}; "
                f"learn it with `clipsearch learn {name} --positive PATH`"
            )
        return self._concept(rows[0])

    def save(self, concept: Concept) -> None:
        """Store a concept, replacing one of the same name (one commit).

        Raises:
            ModelMismatchError: the concept was learned with another model's vectors.
        """
        import pyarrow as pa

        check_name(concept.name)
        self._check_model(concept)
        row = {
            "name": concept.name,
            "method": concept.method,
            "model": json.dumps(concept.model.to_dict()),
            "vector": np.asarray(concept.vector, dtype=np.float32).tolist(),
            "bias": float(concept.bias),
            "example_ids": list(concept.example_ids),
            "negative_ids": list(concept.negative_ids),
            "seed": int(concept.seed),
            "accuracy": concept.accuracy,
            "params": json.dumps(concept.params, default=_json_default),
            "created_at": concept.created_at,
        }
        data = pa.Table.from_pylist([row], schema=_schema())
        self._open(create=True).merge_insert("name").when_matched_update_all().when_not_matched_insert_all().execute(
            data
        )
        logger.info("saved concept %s (%s) in %s", concept.name, concept.method, self.table_name)

    def remove(self, name: str) -> None:
        """Delete a concept.

        Raises:
            QueryError: no such concept.
        """
        self.get(name)
        self._open().delete(f"name = '{name}'")

    def _check_model(self, concept: Concept) -> None:
        """Refuse a concept whose vectors are another model's."""
        from retrieval.store import _same_space

        mine = self.store.model_info
        if not _same_space(concept.model, mine):
            raise ModelMismatchError(
                f"concept @{concept.name} was learned with model {concept.model.name!r} (weights "
                f"{concept.model.weights_sha256[:12]}), not {mine.name!r} (weights {mine.weights_sha256[:12]}); "
                f"use --model {concept.model.name!r}, or learn it again with this model"
            )

    def _concept(self, row: dict[str, Any]) -> Concept:
        """A row as a checked `Concept`."""
        try:
            concept = Concept(
                name=row["name"],
                method=row["method"],
                model=ModelInfo.from_dict(json.loads(row["model"])),
                vector=np.asarray(row["vector"], dtype=np.float32),
                bias=float(row["bias"]),
                example_ids=tuple(row["example_ids"]),
                negative_ids=tuple(row["negative_ids"]),
                seed=int(row["seed"]),
                accuracy=row["accuracy"],
                params=json.loads(row["params"]),
                created_at=row["created_at"],
            )
        except (KeyError, ValueError, TypeError) as e:
            raise StoreError(
                f"concept {row.get('name')!r} in {self.table_name} is unreadable ({e!r}); remove it with "
                f"`clipsearch concepts rm {row.get('name')}` and learn it again"
            ) from e
        self._check_model(concept)
        return concept

    def _elsewhere(self, name: str) -> str | None:
        """The model name of another table of this store directory that has a concept `name`."""
        if not NAME_PATTERN.fullmatch(name):
            return None
        from retrieval.store import _connect, _table_names

        db = _connect(self.store.path)
        for table_name in _table_names(db):
            if table_name.startswith(_PREFIX) and table_name != self.table_name:
                rows = db.open_table(table_name).search().where(f"name = '{name}'").limit(1).to_arrow().to_pylist()
                if rows:
                    return ModelInfo.from_dict(json.loads(rows[0]["model"])).name
        return None


def resolve_terms(terms: Sequence[Term], book: ConceptBook) -> tuple[list[Term], Concept | None]:
    """Replace `@name` terms by their concepts' vectors.

    A concept contributes its unit direction, which combines like the vector of a text (for CoOp it is made
    of text vectors; for a probe, ranking by cosine with it is ranking by its probability). A query that is a
    probe concept alone is returned as that concept too, so a search can show the probability as the score.

    Returns:
        (terms with only text, image and vector kinds; the probe concept of a lone-probe query, or None).

    Raises:
        QueryError: an unknown concept name (the message lists the known ones).
        ModelMismatchError: a concept learned with another model.
    """
    out, concepts = [], []
    for term in terms:
        if term.kind != "concept":
            out.append(term)
            continue
        concept = book.get(term.value)
        concepts.append((term, concept))
        out.append(Term(term.weight, "vector", concept.direction))
    alone = len(terms) == 1 and concepts and concepts[0][1].method == "probe" and concepts[0][0].weight > 0
    return out, concepts[0][1] if alone else None


def tag_concept(store: Store, concept: Concept, column: str | None = None) -> tuple[int, int]:
    """Write "yes" or "no" for every stored image into a text column: whether the concept's probability is at
    least 0.5 (from the stored vectors; no image is read). Filter with `--where "rex = 'yes'"`.

    Args:
        store: the open store of the concept's model (the caller holds the indexer's write lock).
        concept: the concept.
        column: the column to write; default the concept's name.

    Returns:
        (images tagged, of which "yes").

    Raises:
        QueryError: a bad column name, or one of the store's own columns.
        StoreError: the column exists with another type.
    """
    ids, vectors = store.all_vectors()
    shown = concept.probability(vectors) >= 0.5 if len(ids) else np.zeros(0, dtype=bool)
    store.set_column(column or concept.name, ids, ["yes" if s else "no" for s in shown])
    return len(ids), int(shown.sum())
