"""`Library`'s pages of results and its stored files, checked before they are served: what `clipsearch serve` needs.

Mixed into `clipsearch.library.Library`.
"""

from __future__ import annotations

import functools
import os
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from retrieval.errors import NotFoundError, StoreError
from retrieval.query import IMAGENET_TEMPLATES, SearchPage, as_terms, build_filter, search_page
from retrieval.regions import StoredImage
from retrieval.roots import Roots

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from retrieval.query import Term
    from retrieval.row_cache import RowCache
    from retrieval.store import Store

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def unchanged_since_indexed(row: dict[str, Any], stat: os.stat_result) -> bool:
    """Whether a file's stat still shows the size and mtime its row recorded (rows read back hold microseconds)."""
    stored_us = (row["mtime"] - _EPOCH) // timedelta(microseconds=1)
    return (row["size"], stored_us) == (stat.st_size, stat.st_mtime_ns // 1000)


class StoredFile(NamedTuple):
    """A stored image's file, checked for serving (see `Library.image_file`)."""

    id: int
    path: Path  # symlinks resolved; inside an indexed root
    content_hash: str  # SHA-256 of the content, hex: what the id stands for
    format: str | None  # Pillow's format name: JPEG, PNG, ...
    size: int  # bytes


class ServingMethods:
    """The web app's half of `Library`: pages, "more like this" by id, and checked files."""

    _roots: tuple[tuple[int, int, int], Roots] | None = None  # (the state file's inode, mtime, size), its roots

    def search_page(
        self,
        query: Any,
        k: int = 10,
        offset: int = 0,
        where: str | None = None,
        *,
        in_dir: str | os.PathLike[str] | None = None,
        after: date | datetime | None = None,
        before: date | datetime | None = None,
        threshold: float | str | None = None,
        show_weak: bool = False,
        ensemble: bool = False,
        templates: Sequence[str] = IMAGENET_TEMPLATES,
    ) -> SearchPage:
        """Results `offset + 1 .. offset + k` of a search; pages fit together without duplicates or gaps.

        Takes every query `search` takes (`@name` concepts too), and also stored images (`StoredImage(id)`,
        optionally with a `Box`) and regions of images (`Region(image, box)`), alone or weighted in a list. Stored
        images of the query are left out of its results, as `similar` leaves out its query image. `threshold`
        and `show_weak` work as in `search`: "auto" (text queries only) cuts every page at the cutoff computed
        from the ranking's best hit, and `page.cutoff` says where (inf: no good match).

        Returns:
            `SearchPage(results, offset, next_offset, total, cutoff)`.

        Raises:
            NotFoundError: a stored image of the query is not in the store (or its file is not servable).
            QueryError: a bad k, offset, box, filter or threshold, "auto" for a query that is not all text, an
                unknown concept, or terms that cancel out.
        """
        from clipsearch.library import _is_auto

        terms = as_terms(query)
        auto = _is_auto(threshold, terms)
        condition = build_filter(where, in_dir=in_dir, after=after, before=before)
        store = self.store()
        with store.pinned_version():  # one version read for the index, the views and the rows alike
            return self._search_page(
                store, terms, k, offset, condition, threshold, auto, show_weak, ensemble, templates
            )

    def _search_page(
        self,
        store: Store,
        terms: list[Term],
        k: int,
        offset: int,
        condition: str | None,
        threshold: float | str | None,
        auto: bool,
        show_weak: bool,
        ensemble: bool,
        templates: Sequence[str],
    ) -> SearchPage:
        """`search_page` within one pinned store version."""
        from clipsearch.library_concepts import as_probability

        index = self.ann_index()
        if not len(index):
            self._searchable_store()  # says how to fill an empty store
        probe = None
        if any(term.kind == "concept" for term in terms):
            vector, threshold, probe = self._concept_query(store, terms, threshold, ensemble, templates)
        else:
            vector = self.encode(terms, ensemble=ensemble, templates=templates)
        cutoff = None  # the bar as a function of the best hit's score, when pages are cut (or marked) after ranking
        if auto:
            cutoff = functools.partial(self._auto_cutoff, vector=vector, store=store)
        elif threshold is not None and show_weak:
            cutoff = _constant(float(threshold))
        exclude = [t.value.id for t in terms if isinstance(t.value, StoredImage)]
        page = search_page(
            store, index, vector, k, offset, condition, None if auto or show_weak else threshold, exclude,
            self._rows(), self.view_index(), cutoff, show_weak,
        )  # fmt: skip
        bar = page.cutoff if page.cutoff is not None or threshold is None or auto else float(threshold)
        if probe is not None:  # the score shown is the probe's probability, the bar too
            page = page._replace(results=as_probability(page.results, probe))
            bar = None if bar is None else float(probe.probability_from_cosine(bar))
        return page._replace(cutoff=bar)

    def similar_to_id(
        self,
        row_id: int,
        k: int = 10,
        offset: int = 0,
        where: str | None = None,
        *,
        in_dir: str | os.PathLike[str] | None = None,
        after: date | datetime | None = None,
        before: date | datetime | None = None,
        threshold: float | None = None,
        show_weak: bool = False,
    ) -> SearchPage:
        """A "more like this" page: the images nearest to stored image `row_id` (itself left out), by its
        stored vector, so no image tower loads."""
        return self.search_page(
            StoredImage(row_id), k, offset, where, in_dir=in_dir, after=after, before=before, threshold=threshold,
            show_weak=show_weak,
        )  # fmt: skip

    def _rows(self) -> RowCache | None:
        """The in-memory row metadata when `row_cache` is on (for the store as opened now)."""
        if not self.row_cache:
            return None
        from retrieval.row_cache import RowCache  # here: pyarrow, which a one-shot query may never need

        store = self.store()
        if self._row_cache is None or self._row_cache.store is not store:
            self._row_cache = RowCache(store)
        return self._row_cache

    def warm_up(self) -> int:
        """Load now what a search needs, rather than on the first search: the text tower (and its query copy, its
        weights prepacked for a server's many one-text queries: `retrieval.model.prepacked`), the store, the FAISS
        index and, with `row_cache`, the rows' metadata.

        Returns:
            The number of images in the store.

        Raises:
            StoreError: no store, or no images for this model in it.
        """
        store = self._searchable_store()
        self.encode("a photo")
        if self._query_text_model is not None:
            from retrieval.model.prepacked import prepacked_text_model

            self._query_text_model = prepacked_text_model(self._query_text_model)
            self._text_vectors.clear()  # (the same vectors, but the next line is to run the packed copy)
            self.encode("a photo")  # the packed copy's first run, off the first search's time
        self.ann_index()
        cache = self._rows()
        if cache is not None:
            cache.rows([])
        return store.count()

    def roots(self) -> Roots:
        """The folders indexed into this model's table, with display names.

        Every search and every file served asks for them, and the state file they come from also lists the failed
        files (thousands, in some stores): it is parsed again only when an index run has replaced it (an atomic
        rename: a new inode).
        """
        state = self.store().state
        try:
            stat = os.stat(state.path)
        except OSError:
            return Roots(state.roots())  # no state file yet: nothing to keep
        key = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if self._roots is None or self._roots[0] != key:
            self._roots = (key, Roots(state.roots()))
        return self._roots[1]

    def image_file(self, row_id: int) -> StoredFile:
        """A stored image's file, checked before it is read for someone else: the id is in the store, the file
        (symlinks resolved) is inside a folder the store indexed (also resolved), and it still holds the
        indexed content (same size and mtime, or else the same SHA-256).

        Raises:
            NotFoundError: any check fails; the message says which.
        """
        cache = self._rows()
        try:
            if cache is not None:
                row = cache.rows([row_id])[row_id]
            else:
                row = self.store().rows([row_id], columns=["path", "size", "mtime", "content_hash", "format"])[0]
        except (StoreError, KeyError) as e:
            raise NotFoundError(f"no image {row_id} in the store; it was removed or re-indexed: search again") from e
        path = row["path"]
        real = os.path.realpath(path)
        if not self.roots().holds_real(path):
            raise NotFoundError(
                f"image {row_id} is no longer inside an indexed folder (moved, or replaced by a link to elsewhere); "
                "run `clipsearch index` on its folder"
            )
        try:
            stat = os.stat(real)
        except OSError as e:
            raise NotFoundError(f"image {row_id}'s file is gone; run `clipsearch index` on its folder") from e
        if (
            not unchanged_since_indexed(row, stat) and _sha256(real) != row["content_hash"]
        ):  # a touched file with the same bytes is fine
            raise NotFoundError(
                f"image {row_id}'s file changed since it was indexed; run `clipsearch index` on its folder"
            )
        return StoredFile(row_id, Path(real), row["content_hash"], row["format"], stat.st_size)


def _constant(value: float) -> Callable[[float], float]:
    """A cutoff that is `value` whatever the best score."""
    return lambda best: value


def _sha256(path: str) -> str | None:
    """The SHA-256 of a file's bytes, hex; None when it cannot be read."""
    import hashlib

    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()
