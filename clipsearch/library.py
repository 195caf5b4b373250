"""`Library`: the Python API over one store and one model — index folders, search by text, image or a mix.

    import clipsearch
    lib = clipsearch.Library()                       # $CLIPSEARCH_HOME, $CLIPSEARCH_MODEL (or the store's model)
    lib.index(["~/Pictures"])
    for hit in lib.search("a dog on a beach", k=5):
        print(hit.rank, f"{hit.score:.3f}", hit.path)
    lib.search([(2, "golden retriever"), (1, "pool.jpg"), (-1, "night")])
    lib.similar("~/Pictures/beach.jpg")
    from retrieval.regions import Box, StoredImage
    page = lib.search_page(StoredImage(123, Box(0, 0, 0.5, 1)), k=50, offset=50)   # like image 123's left half, page 2
    lib.learn("rex", positives=["~/Pictures/rex"])   # a personal concept, then:
    lib.search("@rex on a beach")

Models load lazily and only the tower a query needs: a text query builds the text tower alone.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from datetime import date, datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from clipsearch.library_concepts import ConceptMethods
from clipsearch.library_encoders import EncoderMethods, default_model_for  # noqa: F401  # commands import it here
from clipsearch.library_serving import ServingMethods, unchanged_since_indexed
from retrieval.errors import ImageLoadError, ModelMismatchError, NotFoundError, QueryError, StoreError
from retrieval.model.query_text import encode_query_texts, query_text_model  # noqa: F401  # benchmarks import them here
from retrieval.query import (
    IMAGENET_TEMPLATES,
    SearchResult,
    Term,
    as_terms,
    build_filter,
    encode_query,
    refuse_urls,
    search,
    search_saved,
)
from retrieval.regions import Box, Region, StoredImage, crop
from retrieval.relevance import (
    PRESENT_HITS,
    SORTS,
    Calibration,
    apply_cutoff,
    auto_cutoff,
    calibration_for,
    sort_by_date,
)
from retrieval.types import Embeddings, RowIds

if TYPE_CHECKING:
    import torch

    from indexer.pipeline import IndexSummary
    from retrieval.ann import SavedIndex
    from retrieval.duplicates import DuplicateGroup
    from retrieval.faiss_index import AnnIndex
    from retrieval.model.clip import CLIP
    from retrieval.model.preprocess import Preprocess
    from retrieval.row_cache import RowCache
    from retrieval.store import Store
    from retrieval.views import ViewIndex

logger = logging.getLogger(__name__)

SPREAD_SAMPLE = 4096  # stored vectors that measure a query's score spread for `threshold="auto"` without calibration


class Embedded(NamedTuple):
    """Every stored image's vector, for custom work (clustering, deduplication, plotting)."""

    ids: RowIds  # [N] stable row ids
    paths: list[str]  # [N] file paths
    vectors: Embeddings  # [N, D] float32, rows L2-normalised


def _check_folder(store: Store, in_dir: str | os.PathLike[str]) -> None:
    """Refuse an `in_dir` that is no folder and holds no indexed image: a mistyped path, not an empty result.

    A folder that is gone but still has images in the store (an unmounted disk) is searched as usual.

    Raises:
        QueryError: no such folder, and no stored image under it.
    """
    if Path(in_dir).expanduser().is_dir() or len(store.filter_ids(build_filter(in_dir=in_dir))):
        return
    raise QueryError(f"--in {os.fspath(in_dir)}: no such folder, and no indexed image is under it; check the path")


def _is_auto(threshold: float | str | None, terms: Sequence[Term]) -> bool:
    """Whether a threshold asks for the calibrated cutoff (refusing it for what it is not calibrated on).

    Raises:
        QueryError: a threshold that is neither a number, None nor "auto"; "auto" for a non-text query.
    """
    if not isinstance(threshold, str):
        return False
    if threshold != "auto":
        raise QueryError(f"threshold {threshold!r}: give a number (a cosine, e.g. 0.25) or 'auto'")
    if any(term.kind != "text" for term in terms):
        raise QueryError(
            "threshold 'auto' is calibrated for text queries only; give a number for image, vector or @concept queries"
        )
    return True


class Library(EncoderMethods, ConceptMethods, ServingMethods):
    """One store of images embedded with one model.

    Args:
        db: the store directory; None means `$CLIPSEARCH_HOME` (default `~/.local/share/clipsearch`).
        model: a registry name, a checkpoint path, or a loaded `CLIP` (with `.info`, as `load_model` sets);
            None means `$CLIPSEARCH_MODEL`, else the store's model when it holds exactly one registered model,
            else MobileCLIP2-S0.
        device: torch device for the model ("auto": cuda, then mps, then cpu).
        index_type: force the FAISS index type (flat, hnsw, ivf, ivfpq); None keeps the saved one or chooses
            by the collection's size.
        text_precision: "auto" encodes query texts with `query_text_model` (bfloat16 where the CPU has it:
            ~2x faster queries, after a one-time ~0.3-0.6 s to convert and warm up); "float32" keeps the
            model's own precision, the better choice for a process that runs only a query or two.
        precision: "float32", or "int8": dynamically quantised encoders in ONNX Runtime on the CPU, ~1.7x
            faster to index; their vectors are another embedding space, so a store keeps them in a table of
            their own and queries must name the same precision.
        runtime: "auto" runs the encoders in ONNX Runtime when the model is on the CPU (faster than torch; the
            export is made once and cached), in torch on a GPU; "onnx" or "torch" force one.
        row_cache: keep every row's metadata in memory for `search_page` and `image_file` (`RowCache`): each
            page of hits ~20 ms faster at 100k images, ~18 MB, read again after each change of the store; for
            long-lived processes (`clipsearch serve`).
    """

    def __init__(
        self,
        db: str | os.PathLike[str] | None = None,
        model: str | os.PathLike[str] | CLIP | None = None,
        device: str = "auto",
        index_type: str | None = None,
        text_precision: str = "auto",
        row_cache: bool = False,
        precision: str = "float32",
        runtime: str = "auto",
    ) -> None:
        from retrieval.model.export_files import PRECISIONS

        if text_precision not in ("auto", "float32"):
            raise ValueError(f"text_precision must be 'auto' or 'float32', got {text_precision!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if runtime not in ("auto", "onnx", "torch"):
            raise ValueError(f"runtime must be 'auto', 'onnx' or 'torch', got {runtime!r}")
        from retrieval.catalog import store_dir

        self.db = store_dir(db).absolute()  # None: $CLIPSEARCH_HOME or the default; a URI is refused
        self.index_type = index_type
        self.row_cache = row_cache
        self._row_cache: RowCache | None = None
        self._init_encoders(model, device, text_precision, precision, runtime)
        self._store: Store | None = None
        self._index: AnnIndex | None = None
        self._index_version: int | None = None
        self._saved: SavedIndex | None = None
        self._store_checked = False
        self._duplicates: tuple[tuple[int, float], list[DuplicateGroup]] | None = None
        self._views: tuple[int, ViewIndex | None] | None = None  # (store version, the sub-views' index)
        self._saved_views: ViewIndex | None = None
        self._saved_views_fingerprint: str | None = None
        self._spread_sample: tuple[int, Embeddings] | None = None  # (store version, `_score_sample`)

    # ---- parts, loaded on first use ------------------------------------------------------------

    def store(self) -> Store:
        """The open store for this model.

        Raises:
            StoreError: no store, or no images for this model in it.
            ModelMismatchError: the store only holds other models' images.
        """
        if self._store is None:
            from retrieval.store import Store

            self._store = Store.open(self.db, self.model_info)
        return self._store

    def _searchable_store(self) -> Store:
        """The store, refusing an empty one with the command that fills it."""
        store = self.store()
        if store.count() == 0:
            raise StoreError(
                f"no images indexed for model {self.model_info.name!r} in {self.db}; "
                "run `clipsearch index FOLDER` first"
            )
        return store

    def _check_searchable(self) -> None:
        """Refuse a search that cannot find anything before a model loads: loading one may mean downloading
        hundreds of MB, only to learn that there is no store, no image in it, or none for this registry model.

        Raises:
            StoreError: no store at `db`, or no images for the model in it.
            ModelMismatchError: a registry model named whose images the store does not hold.
        """
        if self._store_checked or self._models or self._given_model is not None:
            return  # a model is loaded already: the store itself says what is wrong
        from retrieval.ann import saved_tables
        from retrieval.model.registry import get_spec, is_registered

        tables = saved_tables(self.db) if self.db.is_dir() else []
        if tables is None:  # a table without a current saved index: count its rows in the store
            from retrieval.store import Store

            tables = [(m.model, Store.open(self.db, m.model).count()) for m in Store.models(self.db)]
        if not tables:
            raise StoreError(f"no image store at {self.db}; run `clipsearch index FOLDER` first")
        name = self.model_name
        spec = get_spec(name) if is_registered(name) else None
        if spec is not None and not spec.bundled:  # its identity is known without its weights
            name = spec.name
            own = [(model, count) for model, count in tables if model.weights_sha256 == spec.sha256]
            if not own and any(count for _, count in tables):
                raise ModelMismatchError(
                    f"the store at {self.db} has no images indexed with model {name!r} (it has: "
                    f"{', '.join(sorted({model.name for model, _ in tables}))}); pass --model with one of those, "
                    f"or run `clipsearch index FOLDER --model {name}`"
                )
            tables = own
        if not any(count for _, count in tables):
            raise StoreError(f"no images indexed for model {name!r} in {self.db}; run `clipsearch index FOLDER` first")
        self._store_checked = True

    def ann_index(self) -> AnnIndex:
        """The FAISS index, synced with the store whenever the store has changed since the last call (in memory,
        once loaded: see `retrieval.ann.sync_index`)."""
        from retrieval.ann import open_index, sync_index

        store = self.store()
        version = store.version
        if self._index is None:
            self._index = open_index(store, kind=self.index_type)
            self._index_version = version
        elif self._index_version != version:
            self._index = sync_index(self._index, store, kind=self.index_type)
            self._index_version = version
        return self._index

    def view_index(self) -> ViewIndex | None:
        """The sub-views' FAISS index (`retrieval.views.open_view_index`), brought up to date whenever the store
        has changed; None when the store was indexed without views."""
        from retrieval.views import open_view_index

        store = self.store()
        if self._views is None or self._views[0] != store.version:
            self._views = (store.version, open_view_index(store))
        return self._views[1]

    def _has_views(self) -> bool:
        """Whether the model's table has sub-views, seen from its files alone (no LanceDB import)."""
        from retrieval.views import views_table_name

        return (self.db / f"{views_table_name(self.model_info.table_name)}.lance").is_dir()

    def _saved_view_index(self) -> ViewIndex | None:
        """The saved index of the sub-views if it reflects their table as it is now, read without opening the
        store (`retrieval.views.open_saved_view_index`); kept while that table's fingerprint stays the same."""
        from retrieval.ann import table_fingerprint
        from retrieval.views import open_saved_view_index, views_table_name

        info = self.model_info
        fingerprint = table_fingerprint(self.db / f"{views_table_name(info.table_name)}.lance")
        if self._saved_views is None or fingerprint is None or self._saved_views_fingerprint != fingerprint:
            self._saved_views = open_saved_view_index(self.db, info)
            self._saved_views_fingerprint = fingerprint
        return self._saved_views

    def _saved_index(self) -> SavedIndex | None:
        """The saved index with its paths if it reflects the table as it is now, read without opening the
        store (see `retrieval.ann.open_saved_index`); kept while the table's fingerprint stays the same."""
        from retrieval.ann import open_saved_index, table_fingerprint

        info = self.model_info
        fingerprint = table_fingerprint(self.db / f"{info.table_name}.lance")
        if self._saved is None or fingerprint is None or self._saved.fingerprint != fingerprint:
            self._saved = open_saved_index(self.db, info, kind=self.index_type)
        return self._saved

    # ---- writing -------------------------------------------------------------------------------

    def index(self, paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], **options: Any) -> IndexSummary:
        """Index folders (or image files) into the store: new and changed files are embedded, deleted ones
        removed, moved ones kept. The FAISS index is brought up to date afterwards.

        Args:
            paths: folders or files.
            **options: fields of `indexer.pipeline.IndexOptions` (workers, batch_size, exclude, ...).

        Returns:
            The run's summary (indexed, unchanged, moved, removed, failed, ...).
        """
        from indexer.pipeline import IndexOptions, index_folders
        from retrieval.ann import open_index
        from retrieval.store import Store

        if isinstance(paths, str | os.PathLike):
            paths = [paths]
        preprocess = self._model("image")[1]
        encoder = self._encoder("image")
        store = Store.open(self.db, encoder.info, create=True)
        summary = index_folders(list(paths), encoder, preprocess, store, IndexOptions(**options))
        self._store = store
        self._index = open_index(store, kind=self.index_type)
        self._index_version = store.version
        return summary

    # ---- reading -------------------------------------------------------------------------------

    def encode(self, query: Any, ensemble: bool = False, templates: Sequence[str] = IMAGENET_TEMPLATES) -> np.ndarray:
        """The unit query vector for a query (see `search` for the forms a query may take)."""
        terms = as_terms(query)

        return encode_query(terms, self._encode_texts, self._encode_images, ensemble=ensemble, templates=templates)

    def _encode_images(self, images: list[Any]) -> Embeddings:
        """Embed query images: paths, PIL images, `StoredImage`s and `Region`s (a whole stored image takes its
        stored vector, so it needs no image tower)."""
        import torch

        from retrieval.model.encode import encode_images

        vectors: list[np.ndarray | None] = [None] * len(images)
        for i, image in enumerate(images):
            if isinstance(image, StoredImage) and image.box is None:
                vectors[i] = self._vector_of(image.id)
        todo = [i for i, v in enumerate(vectors) if v is None]
        if todo:
            preprocess = self._model("image")[1]
            pixels = torch.stack([self._pixels(images[i], preprocess) for i in todo])  # [B, 3, S, S]
            for i, vector in zip(todo, encode_images(self._encoder("image"), pixels), strict=True):
                vectors[i] = vector
        return np.stack(vectors)

    def _pixels(self, image: Any, preprocess: Preprocess) -> torch.Tensor:
        """The model's input for one query image, a region cropped out first."""
        from retrieval.model.preprocess import open_image, to_rgb

        if isinstance(image, Path) and not image.is_file():
            raise ImageLoadError(f"query image {image}: no such file")
        if isinstance(image, StoredImage):  # with a box: the region of its file
            image = Region(self.image_file(image.id).path, image.box)
        if not isinstance(image, Region):
            return preprocess(image)
        source = open_image(image.image) if isinstance(image.image, str | os.PathLike) else image.image
        box = image.box
        # decode a JPEG reduced only as far as keeps the crop's shorter side at the model's resolution
        min_size = math.ceil(preprocess.image_size / max(min(box.x1 - box.x0, box.y1 - box.y0), 1e-3))
        return preprocess.transform(crop(to_rgb(source, min_size=min_size), box))

    def _vector_of(self, row_id: int) -> np.ndarray:
        """The stored vector of an image id (with `row_cache`, taken by its row's position: no scan)."""
        gone = f"no image {row_id} in the store; it was removed or re-indexed: search again"
        cache = self._rows()
        try:
            vector = cache.vector(row_id) if cache is not None else self.store().vectors_for([row_id])[0]
        except StoreError as e:
            raise NotFoundError(gone) from e
        if vector is None:
            raise NotFoundError(gone)
        return vector

    def search(
        self,
        query: Any,
        k: int = 10,
        where: str | None = None,
        *,
        in_dir: str | os.PathLike[str] | None = None,
        after: date | datetime | None = None,
        before: date | datetime | None = None,
        threshold: float | str | None = None,
        ensemble: bool = False,
        templates: Sequence[str] = IMAGENET_TEMPLATES,
        metadata: bool = True,
        show_weak: bool = False,
        sort: str = "score",
        collapse_duplicates: bool = False,
    ) -> list[SearchResult]:
        """The images nearest to a query.

        Args:
            query: a text; an image (a `Path`, a str naming an existing image file, or a PIL image); a [D]
                vector; or a list of those and `(weight, term)` tuples, combined as the weighted sum of their
                unit vectors (negative weights subtract), renormalised.
            k: results wanted.
            where: a LanceDB SQL filter over the store's columns, e.g. `"format = 'PNG' AND width > 1000"`.
            in_dir: only images under this folder.
            after: only images whose EXIF capture time is at or after this.
            before: only images captured before this.
            threshold: drop results with a cosine similarity below it; "auto" computes a cutoff for this query
                from the model's calibration, its best hit and the model's temperature
                (`retrieval.relevance`), so that a query with no good match returns nothing. Text queries only.
            ensemble: embed texts as the mean over CLIP's prompt templates.
            templates: the templates for `ensemble`.
            metadata: False when only path and score are needed (each result's metadata then holds just its
                `id`): an unfiltered search then runs on the saved index and paths alone whenever the store
                has not changed since they were saved, without opening the store (a faster start).
            show_weak: also return the results below the threshold, marked `weak=True`.
            sort: "score" (best first) or "date" (the k best matches by EXIF capture time, oldest first; those
                without one last, by score).
            collapse_duplicates: show each group of near-duplicates (`duplicates`) as its best member only.

        Returns:
            `SearchResult(path, score, rank, metadata, weak)` records, best first (or by date).

        Raises:
            QueryError: `threshold="auto"` for a query with an image or vector term, an unknown threshold or sort.
        """
        self._check_searchable()
        terms = as_terms(query)
        auto = _is_auto(threshold, terms)
        if sort not in SORTS:
            raise QueryError(f"unknown sort {sort!r}; use one of {', '.join(SORTS)}")
        condition = build_filter(where, in_dir=in_dir, after=after, before=before)
        if any(term.kind == "concept" for term in terms):
            results = self._concept_search(terms, k, condition, threshold, ensemble, templates)
            if not results and in_dir is not None:
                _check_folder(self.store(), in_dir)
            return sort_by_date(results) if sort == "date" else results
        calibrated = not auto or self._calibration() is not None
        fetch_threshold = None if auto or show_weak else threshold
        fetch_k = max(k, PRESENT_HITS) if auto else k  # "auto" weighs the best few hits, however few are wanted
        plain = not metadata and condition is None and sort == "score" and not collapse_duplicates
        if plain and calibrated:
            saved = self._saved_index()
            views = self._saved_view_index() if saved is not None and self._has_views() else None
            if saved is not None and (views is not None or not self._has_views()):
                vector = self.encode(terms, ensemble=ensemble, templates=templates)
                results = search_saved(saved, vector, fetch_k, threshold=fetch_threshold, views=views)
                return self._relevant(results, threshold, vector, None, show_weak, sort)[:k]
        store = self._searchable_store()
        vector = self.encode(terms, ensemble=ensemble, templates=templates)
        hidden = self._hidden_duplicates() if collapse_duplicates else []
        results = self._ranked(store, vector, fetch_k, condition, fetch_threshold, hidden, in_dir)
        return self._relevant(results, threshold, vector, store, show_weak, sort, k)

    def _ranked(
        self,
        store: Store,
        vector: np.ndarray,
        k: int,
        condition: str | None,
        threshold: float | None,
        exclude: list[int],
        in_dir: str | os.PathLike[str] | None,
    ) -> list[SearchResult]:
        """The k nearest images the filter and threshold let through (and their views), saying so when `in_dir`
        names no folder and nothing was found."""
        results = search(
            store, self.ann_index(), vector, k, where=condition, threshold=threshold, exclude=exclude,
            views=self.view_index(),
        )  # fmt: skip
        if not results and in_dir is not None:
            _check_folder(store, in_dir)
        return results

    def _calibration(self) -> Calibration | None:
        """The model's shipped relevance calibration, if it has one."""
        return calibration_for(self.model_info.weights_sha256)

    def _relevant(
        self,
        results: list[SearchResult],
        threshold: float | str | None,
        vector: np.ndarray,
        store: Store | None,
        show_weak: bool,
        sort: str,
        k: int | None = None,
    ) -> list[SearchResult]:
        """The first k results at the threshold (weak ones kept and marked with `show_weak`), in the order asked."""
        if results and threshold is not None:
            if threshold == "auto":
                cutoff = self._auto_cutoff([r.score for r in results[:PRESENT_HITS]], vector, store)
            else:
                cutoff = float(threshold)
            results = apply_cutoff(results, cutoff, show_weak)
        results = results[:k]
        return sort_by_date(results) if sort == "date" else results

    def _auto_cutoff(self, top: float | Sequence[float], vector: np.ndarray, store: Store | None) -> float:
        """The per-query cutoff of `threshold="auto"` (`retrieval.relevance.auto_cutoff`) from its best score(s)."""
        temperature = float(self._model("text")[0].logit_scale.detach().exp())  # float32, not the bfloat16 copy
        calibration = self._calibration()
        scores = None
        if calibration is None:
            logger.info("model %s ships no relevance calibration; cutting at its scores' spread", self.model_name)
            # einsum, not @: a matrix-vector product this small on BLAS's threads took 47 ms instead of 0.5 on 2
            # busy cores (and burned 6 ms of CPU where einsum's one thread takes 0.6)
            scores = np.einsum("ij,j->i", self._score_sample(store or self._searchable_store()), vector)
        return auto_cutoff(top, temperature, calibration, scores)

    def _score_sample(self, store: Store) -> Embeddings:
        """The stored vectors a query's score spread is measured on without a calibration: all of them up to
        `SPREAD_SAMPLE`, else that many drawn at random (seeded), kept while the store's version stays the same.
        On the 100k-vector store of `benchmarks/serve_speed.py` the cutoff moved by 1.4 % (median; 3.1 % at most,
        20 queries) of its distance from the median, and a query costs a 4096-row product instead of reading every
        vector again (100k: 200 MB, 2.4 s under load)."""
        version = store.version
        if self._spread_sample is None or self._spread_sample[0] != version:
            ids = store.ids()
            if len(ids) > SPREAD_SAMPLE:
                ids = np.sort(np.random.default_rng(0).choice(ids, SPREAD_SAMPLE, replace=False))
                vectors = store.vectors_for(ids)
            else:
                _, vectors = store.all_vectors()
            self._spread_sample = (version, vectors)
        return self._spread_sample[1]

    def _hidden_duplicates(self) -> list[int]:
        """Ids of every near-duplicate that is not its group's best member."""
        return [member.id for group in self.duplicates() for member in group.members[1:]]

    def similar(
        self,
        path: str | os.PathLike[str],
        k: int = 10,
        where: str | None = None,
        *,
        in_dir: str | os.PathLike[str] | None = None,
        after: date | datetime | None = None,
        before: date | datetime | None = None,
        threshold: float | None = None,
        show_weak: bool = False,
        sort: str = "score",
        collapse_duplicates: bool = False,
        concept: str | None = None,
        box: Box | str | None = None,
    ) -> list[SearchResult]:
        """The images most like the image at `path`, inside the store or not (itself excluded when inside).

        An indexed, unchanged file uses its stored vector; any other file is read and embedded. `threshold`,
        `show_weak`, `sort` and `collapse_duplicates` work as in `search`, except that "auto" is for text only.
        With `concept`, the learned concept's vector is added as a term of equal weight (as `query PATH + @name`).
        With `box` ("x0,y0,x1,y1" or a `Box`, fractions of the upright image) only that region of the file is
        embedded, as the web app's region queries do.

        Raises:
            ImageLoadError: the file is missing or not a readable image.
            QueryError: `path` is an http(s) URL; `threshold="auto"`; an unknown sort; a malformed box.
        """
        if box is not None and not isinstance(box, Box):
            box = Box.parse(box)
        refuse_urls(os.fspath(path))
        _is_auto(threshold, [Term(1.0, "image", path)])
        if sort not in SORTS:
            raise QueryError(f"unknown sort {sort!r}; use one of {', '.join(SORTS)}")
        path = Path(path).expanduser()
        if not path.is_file():
            raise ImageLoadError(f"{path}: no such file")
        self._check_searchable()
        self._model("image")  # before the store: its identity then comes from the tower a re-encode needs
        store = self._searchable_store()
        row_id = store.id_for_path(path)
        vector = self._stored_vector(store, row_id, path) if row_id is not None and box is None else None
        if vector is None:
            vector = self._encode_images([path if box is None else Region(path, box)])[0]
        if concept is not None:
            from retrieval.concepts import ConceptBook

            combined = vector / np.linalg.norm(vector) + ConceptBook(store).get(concept).direction
            vector = (combined / np.linalg.norm(combined)).astype(np.float32)
        condition = build_filter(where, in_dir=in_dir, after=after, before=before)
        exclude = [row_id] if row_id is not None else []
        if collapse_duplicates:
            exclude += self._hidden_duplicates()
        fetch_threshold = None if show_weak else threshold
        results = self._ranked(store, vector, k, condition, fetch_threshold, exclude, in_dir)
        return self._relevant(results, threshold, vector, store, show_weak, sort)

    @staticmethod
    def _stored_vector(store: Store, row_id: int, path: Path) -> np.ndarray | None:
        """The stored vector of `path` if the file is unchanged since it was indexed (same size and mtime)."""
        row = store.rows([row_id], columns=["size", "mtime", "vector"])[0]
        return row["vector"] if unchanged_since_indexed(row, path.stat()) else None

    def status(self) -> dict[str, Any]:
        """The store's model, image count, FAISS index state, and the other models the store directory holds."""
        from retrieval.ann import index_state
        from retrieval.store import Store

        store = self.store()
        return {
            "db": str(self.db),
            "model": store.model_info.to_dict(),
            "table": store.table_name,
            "images": store.count(),
            "store_version": store.version,
            "index": index_state(store),
            "models": [m.model.name for m in Store.models(self.db)],
            "checked_at": datetime.now(timezone.utc).isoformat(),
        }

    def embeddings(self) -> Embedded:
        """Every stored image's id, path and vector."""
        store = self.store()
        ids, vectors = store.all_vectors()
        paths = [row["path"] for row in store.rows(ids, columns=["path"])] if len(ids) else []
        return Embedded(ids, paths, vectors)

    def duplicates(self, threshold: float | None = None) -> list[DuplicateGroup]:
        """Groups of near-identical images (exact copies, re-encodes, resizes, light crops, bursts), best first.

        Args:
            threshold: the cosine at or above which two images are duplicates; None means
                `retrieval.duplicates.DEFAULT_THRESHOLD`.

        Returns:
            `DuplicateGroup`s; each one's `members` start with its best pick (largest, then oldest, then
            shortest path).
        """
        from retrieval.duplicates import DEFAULT_THRESHOLD, find_duplicates

        self._check_searchable()
        store = self._searchable_store()
        threshold = DEFAULT_THRESHOLD if threshold is None else threshold
        key = (store.version, threshold)
        if self._duplicates is None or self._duplicates[0] != key:
            self._duplicates = (key, find_duplicates(store, self.ann_index(), threshold))
        return self._duplicates[1]
