"""`Library`'s personal concepts: learn one from example images, list, forget, and search with `@name`.

Mixed into `clipsearch.library.Library`; the learning itself is `retrieval.concepts`, over stored vectors.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retrieval.errors import ImageLoadError, NotFoundError, QueryError, StoreError
from retrieval.query import SearchResult, build_filter, search
from retrieval.regions import StoredImage
from retrieval.types import Embeddings

if TYPE_CHECKING:
    from retrieval.concepts import Concept
    from retrieval.store import Store

logger = logging.getLogger(__name__)


def as_probability(results: list[SearchResult], probe: Concept | None) -> list[SearchResult]:
    """The results of a lone probe concept's query scored by its probability (unchanged without one)."""
    if probe is None:
        return results
    return [hit._replace(score=float(probe.probability_from_cosine(hit.score))) for hit in results]


class ConceptMethods:
    """The concept half of `Library` (it relies on the library's store, encoders and index)."""

    def _concept_search(
        self,
        terms: list[Any],
        k: int,
        condition: str | None,
        threshold: float | None,
        ensemble: bool,
        templates: Sequence[str],
    ) -> list[SearchResult]:
        """`search` for a query with `@name` terms (see `_concept_query`)."""
        store = self._searchable_store()
        vector, cosine, probe = self._concept_query(store, terms, threshold, ensemble, templates)
        return as_probability(search(store, self.ann_index(), vector, k, where=condition, threshold=cosine), probe)

    def _concept_query(
        self, store: Store, terms: list[Any], threshold: float | None, ensemble: bool, templates: Sequence[str]
    ) -> tuple[np.ndarray, float | None, Concept | None]:
        """The query vector of terms with `@name` terms, the threshold as a cosine, and the probe concept whose
        probability is the score (`as_probability`): a lone probe concept ranks by its probability (the score,
        and what `threshold` applies to); otherwise the concepts' vectors combine with the other terms.

        Raises:
            QueryError: an unknown concept (the message lists the known ones).
        """
        from retrieval.concepts import ConceptBook, resolve_terms

        terms, probe = resolve_terms(terms, ConceptBook(store))
        if probe is None:
            return self.encode(terms, ensemble=ensemble, templates=templates), threshold, None
        cosine = None if threshold is None else probe.cosine_for_probability(threshold)
        return probe.direction, cosine, probe

    def learn(
        self,
        name: str,
        positives: Sequence[str | os.PathLike[str] | StoredImage],
        negatives: Sequence[str | os.PathLike[str] | StoredImage] = (),
        method: str = "auto",
        *,
        seed: int = 0,
        n_ctx: int | None = None,
        steps: int | None = None,
    ) -> Concept:
        """Learn a personal concept from example images and save it in the store, replacing one of that name.

        Examples are stored images (their paths, or `StoredImage(id)` as the web app names them; their vectors
        are used as stored), other image files (embedded on the fly) or folders of either. Without negatives,
        they are sampled from the store (see `retrieval.concepts`). Then `search("@name")` finds it.

        Args:
            name: the concept's name (a letter, then letters, digits or _).
            positives: images or folders showing the concept.
            negatives: images or folders that do not.
            method: "probe" (linear probe), "coop" (learned prompt context) or "auto" (the better held-out
                accuracy).
            seed: makes the sampling, the split and the training reproducible.
            n_ctx: CoOp context vectors (default 4, initialised from "a photo of a").
            steps: CoOp optimisation steps (default 200).

        Returns:
            The saved concept, with its held-out accuracy.

        Raises:
            QueryError: a bad name or method, or no usable example.
            ImageLoadError: an example path that is neither a file, a folder, nor an image in the store.
            NotFoundError: a `StoredImage` id that is not in the store.
        """
        from retrieval.concepts import (
            DEFAULT_N_CTX,
            DEFAULT_STEPS,
            ConceptBook,
            check_name,
            learn_concept,
            negatives_wanted,
            sample_negatives,
        )

        check_name(name)
        self._check_searchable()
        store = self._searchable_store()
        pos_vectors, pos_ids, pos_paths = self._examples(store, positives, "--positive")
        extra: dict[str, Any] = {"positive_paths": pos_paths}
        if negatives:
            neg_vectors, neg_ids, neg_paths = self._examples(store, negatives, "--negative")
            extra.update(negatives_from="given", negative_paths=neg_paths)
        else:
            neg_ids = sample_negatives(store.ids(), pos_ids, negatives_wanted(len(pos_vectors)), seed).tolist()
            neg_vectors = store.vectors_for(neg_ids) if neg_ids else np.zeros((0, store.embed_dim), np.float32)
            extra["negatives_from"] = "sampled from the store"
        concept = learn_concept(
            name,
            pos_vectors,
            neg_vectors,
            store.model_info,
            method,
            text_model=lambda: self._model("text")[0],
            example_ids=pos_ids,
            negative_ids=neg_ids,
            seed=seed,
            n_ctx=DEFAULT_N_CTX if n_ctx is None else n_ctx,
            steps=DEFAULT_STEPS if steps is None else steps,
            extra=extra,
        )
        ConceptBook(store).save(concept)
        return concept

    def learn_classes(
        self,
        folder: str | os.PathLike[str],
        method: str = "auto",
        *,
        seed: int = 0,
        n_ctx: int | None = None,
        steps: int | None = None,
    ) -> list[Concept]:
        """Learn one concept per sub-folder of `folder` (named after it), each against the other classes'
        images as its negatives, and save them.

        Raises:
            QueryError: fewer than two class folders, or a folder name that is not a concept name.
        """
        from retrieval.concepts import check_name

        root = Path(folder).expanduser()
        classes = (
            sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []
        )
        if len(classes) < 2:
            raise QueryError(
                f"--classes {os.fspath(folder)}: give a folder with one sub-folder of images per class (2+)"
            )
        for path in classes:
            check_name(path.name)
        return [
            self.learn(
                path.name, [path], [o for o in classes if o != path], method, seed=seed, n_ctx=n_ctx, steps=steps
            )
            for path in classes
        ]

    def concepts(self) -> list[Concept]:
        """The concepts learned with this library's model, by name."""
        from retrieval.concepts import ConceptBook

        return ConceptBook(self.store()).concepts()

    def forget(self, name: str) -> None:
        """Remove a learned concept.

        Raises:
            QueryError: no concept of that name.
        """
        from retrieval.concepts import ConceptBook

        ConceptBook(self.store()).remove(name)

    def _examples(
        self, store: Store, paths: Sequence[str | os.PathLike[str] | StoredImage], option: str
    ) -> tuple[Embeddings, list[int], list[str]]:
        """Vectors of example images: (vectors [N, D], the stored ids among them, the paths of unstored files
        embedded on the fly). Unreadable files are logged and skipped."""
        from retrieval.query import IMAGE_EXTENSIONS

        files: dict[str, None] = {}
        stored: dict[int, None] = {}
        for given in paths:
            if isinstance(given, StoredImage):
                stored[given.id] = None
                continue
            path = Path(given).expanduser()
            if path.is_dir():
                found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
                files.update((str(p.absolute()), None) for p in found)
                if not found:  # a folder whose files are gone may still have images in the store
                    stored.update((int(i), None) for i in store.filter_ids(build_filter(in_dir=path)))
            elif path.is_file():
                files[str(path.absolute())] = None
            elif (row_id := store.id_for_path(path)) is not None:
                stored[row_id] = None
            else:
                raise ImageLoadError(f"{option} {os.fspath(given)}: no such file or folder, and no stored image")
        embed: list[str] = []
        for file in files:
            row_id = store.id_for_path(file)
            if row_id is not None and self._stored_vector(store, row_id, Path(file)) is not None:
                stored[row_id] = None
            else:
                embed.append(file)
        ids = list(stored)
        try:
            vectors = [store.vectors_for(ids)] if ids else []
        except StoreError as e:
            missing = sorted(set(ids) - set(store.filter_ids(f"id IN ({', '.join(map(str, ids))})").tolist()))
            raise NotFoundError(f"{option}: no image {missing[0]} in the store; it was removed or re-indexed") from e
        embedded = []
        for file in embed:
            try:
                vectors.append(self._encode_images([Path(file)]))
                embedded.append(file)
            except ImageLoadError as e:
                logger.warning("%s %s: skipped: %s", option, file, e)
        if not vectors:
            raise QueryError(f"{option}: no readable image among {', '.join(map(str, paths))}")
        return np.concatenate(vectors).astype(np.float32), ids, embedded
