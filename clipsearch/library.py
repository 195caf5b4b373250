"""`Library`: the Python API over one store and one model — index folders, search by text, image or a mix.

    import clipsearch
    lib = clipsearch.Library()                       # $CLIPSEARCH_HOME, $CLIPSEARCH_MODEL (or the store's model)
    lib.index(["~/Pictures"])
    for hit in lib.search("a dog on a beach", k=5):
        print(hit.rank, f"{hit.score:.3f}", hit.path)
    lib.search([(2, "golden retriever"), (1, "pool.jpg"), (-1, "night")])
    lib.similar("~/Pictures/beach.jpg")

Models load lazily and only the tower a query needs: a text query builds the text tower alone.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from retrieval.errors import ImageLoadError, ModelMismatchError, QueryError, StoreError
from retrieval.query import (
    IMAGENET_TEMPLATES,
    SearchResult,
    as_terms,
    build_filter,
    encode_query,
    refuse_urls,
    search,
    search_saved,
)
from retrieval.types import Embeddings, RowIds

if TYPE_CHECKING:
    from indexer.pipeline import IndexSummary
    from retrieval.ann import SavedIndex
    from retrieval.faiss_index import AnnIndex
    from retrieval.model.clip import CLIP
    from retrieval.model.identity import ModelInfo
    from retrieval.model.preprocess import Preprocess
    from retrieval.store import Store

logger = logging.getLogger(__name__)

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class Embedded(NamedTuple):
    """Every stored image's vector, for custom work (clustering, deduplication, plotting)."""

    ids: RowIds  # [N] stable row ids
    paths: list[str]  # [N] file paths
    vectors: Embeddings  # [N, D] float32, rows L2-normalised


# Up to this many texts are encoded on one thread: a short query's matrices are too small for intra-op
# threads to pay off, and on shared cores each op's thread barrier can wait a whole time slice (measured on 2
# busy cores: ViT-B/32 text tower, one query, 600 ms on 2 threads against 100 ms on 1).
FEW_TEXTS = 8


def query_text_model(model: CLIP) -> CLIP:
    """The model to encode query texts with: a bfloat16 copy of its text tower on a CPU with native bfloat16
    arithmetic (AVX512-BF16 or AMX), else the model itself.

    One short query is a chain of matrix-vector products whose time goes into reading the weights (~150 MB
    for ViT-B/32's text transformer in float32, more than any cache), so half the bytes is about half the
    time: 28.7 -> 12.3 ms a query on this project's 2-core EPYC. The query vector stays within cosine 0.9999
    of the float32 one (the same trade as fp16 autocast on CUDA); stored image vectors are untouched.
    Without native support bfloat16 is emulated and slower, so the model is used as it is.
    """
    import torch

    from retrieval.model.checkpoint import Checkpoint, build_model
    from retrieval.model.clip import CLIP

    native = any(
        getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )
    # Only CLIP's text tower has been measured this way; other families keep float32.
    if not isinstance(model, CLIP) or model.transformer is None:
        return model
    if next(model.parameters()).device.type != "cpu" or not native:
        return model
    tensors = {k: v.to(torch.bfloat16) for k, v in CLIP.state_dict_for_towers(model.state_dict(), "text").items()}
    checkpoint = Checkpoint(tensors, model.config, "bfloat16", "query text tower", Path())
    copy = build_model(checkpoint, towers="text").eval()
    copy.info = getattr(model, "info", None)
    return copy


def encode_query_texts(model: CLIP, texts: list[str]) -> Embeddings:
    """Embed query texts; a handful of them on a single torch thread (see `FEW_TEXTS`)."""
    import torch

    from retrieval.model.encode import encode_texts

    if len(texts) > FEW_TEXTS:
        return encode_texts(model, texts)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return encode_texts(model, texts)
    finally:
        torch.set_num_threads(previous)


def _warn_if_cut(texts: list[str], context_length: int) -> None:
    """Say once, for all the texts of a query, that the text encoder will not see the end of one of them."""
    from retrieval.model.tokenizer import token_count

    if any(token_count(text) > context_length for text in texts):
        logger.warning(
            "the query text is longer than the model's %d tokens; only the first part is used", context_length
        )


def default_model_for(db: str | os.PathLike[str] | None) -> str:
    """The model to use when none is named: `$CLIPSEARCH_MODEL`, else the store's only registered model, else
    the registry default (ViT-B/32)."""
    from retrieval.ann import saved_models
    from retrieval.model.registry import default_model_name, is_registered

    if os.environ.get("CLIPSEARCH_MODEL"):
        return os.environ["CLIPSEARCH_MODEL"]
    models = saved_models(db) if db is not None else None  # answers without importing LanceDB when it can
    if models is None:
        from retrieval.store import Store

        models = [m.model for m in Store.models(db)]
    names = {m.name for m in models if is_registered(m.name)}
    return names.pop() if len(names) == 1 else default_model_name()


def _check_folder(store: Store, in_dir: str | os.PathLike[str]) -> None:
    """Refuse an `in_dir` that is no folder and holds no indexed image: a mistyped path, not an empty result.

    A folder that is gone but still has images in the store (an unmounted disk) is searched as usual.

    Raises:
        QueryError: no such folder, and no stored image under it.
    """
    if Path(in_dir).expanduser().is_dir() or len(store.filter_ids(build_filter(in_dir=in_dir))):
        return
    raise QueryError(f"--in {os.fspath(in_dir)}: no such folder, and no indexed image is under it; check the path")


class Library:
    """One store of images embedded with one model.

    Args:
        db: the store directory; None means `$CLIPSEARCH_HOME` (default `~/.local/share/clipsearch`).
        model: a registry name, a checkpoint path, or a loaded `CLIP` (with `.info`, as `load_model` sets);
            None means `$CLIPSEARCH_MODEL`, else the store's model when it holds exactly one registered model,
            else ViT-B/32.
        device: torch device for the model ("auto": cuda, then mps, then cpu).
        index_type: force the FAISS index type (flat, hnsw, ivf, ivfpq); None keeps the saved one or chooses
            by the collection's size.
        text_precision: "auto" encodes query texts with `query_text_model` (bfloat16 where the CPU has it:
            ~2x faster queries, after a one-time ~0.3-0.6 s to convert and warm up); "float32" keeps the
            model's own precision, the better choice for a process that runs only a query or two.
    """

    def __init__(
        self,
        db: str | os.PathLike[str] | None = None,
        model: str | os.PathLike[str] | CLIP | None = None,
        device: str = "auto",
        index_type: str | None = None,
        text_precision: str = "auto",
    ) -> None:
        if text_precision not in ("auto", "float32"):
            raise ValueError(f"text_precision must be 'auto' or 'float32', got {text_precision!r}")
        if db is None:
            from retrieval.store import default_db_dir

            db = default_db_dir()
        self.db = Path(db).expanduser().absolute()
        self.device = device
        self.index_type = index_type
        self.text_precision = text_precision
        self._given_model = model if model is not None and not isinstance(model, str | os.PathLike) else None
        if self._given_model is not None and getattr(self._given_model, "info", None) is None:
            raise ValueError(
                "a model passed in needs `.info` to match it with a store: load it with `load_model`, or set "
                "`model.info = ModelInfo.for_model(model, name)`"
            )
        self._model_name = None if self._given_model is not None or model is None else os.fspath(model)
        self._models: dict[str, tuple[CLIP, Preprocess]] = {}
        self._store: Store | None = None
        self._index: AnnIndex | None = None
        self._index_version: int | None = None
        self._saved: SavedIndex | None = None
        self._query_text_model: CLIP | None = None
        self._store_checked = False

    # ---- parts, loaded on first use ------------------------------------------------------------

    @property
    def model_name(self) -> str:
        """The name or path of the model this library embeds with."""
        if self._given_model is not None:
            return self._given_model.info.name
        if self._model_name is None:
            self._model_name = default_model_for(self.db)
        return self._model_name

    def _model(self, towers: str) -> tuple[CLIP, Preprocess]:
        """The model with (at least) the tower asked for: "text" or "image"."""
        if self._given_model is not None:
            from retrieval.model.preprocess import Preprocess

            return self._given_model, Preprocess.from_config(self._given_model.config)
        if towers not in self._models:
            from retrieval.model.loading import load_model

            self._models[towers] = load_model(self.model_name, device=self.device, towers=towers)
        return self._models[towers]

    @property
    def model_info(self) -> ModelInfo:
        """The identity of the model's embedding space (loads the text tower if no tower is loaded yet)."""
        model, _ = next(iter(self._models.values())) if self._models else self._model("text")
        return model.info

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
        """The FAISS index, synced with the store whenever the store has changed since the last call."""
        from retrieval.ann import open_index

        store = self.store()
        version = store.version
        if self._index is None or self._index_version != version:
            self._index = open_index(store, kind=self.index_type)
            self._index_version = version
        return self._index

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
        model, preprocess = self._model("image")
        store = Store.open(self.db, model.info, create=True)
        summary = index_folders(list(paths), model, preprocess, store, IndexOptions(**options))
        self._store = store
        self._index = open_index(store, kind=self.index_type)
        self._index_version = store.version
        return summary

    # ---- reading -------------------------------------------------------------------------------

    def encode(self, query: Any, ensemble: bool = False, templates: Sequence[str] = IMAGENET_TEMPLATES) -> np.ndarray:
        """The unit query vector for a query (see `search` for the forms a query may take)."""
        terms = as_terms(query)

        def texts(batch: list[str]) -> Embeddings:
            if self._query_text_model is None:
                model = self._model("text")[0]
                self._query_text_model = query_text_model(model) if self.text_precision == "auto" else model
            if self._query_text_model.config.family == "clip":  # the count is CLIP's tokenizer's
                _warn_if_cut(batch, self._query_text_model.config.text.context_length)
            return encode_query_texts(self._query_text_model, batch)

        return encode_query(terms, texts, self._encode_images, ensemble=ensemble, templates=templates)

    def _encode_images(self, images: list[Any]) -> Embeddings:
        """Embed query images (paths or PIL images)."""
        import torch

        from retrieval.model.encode import encode_images

        model, preprocess = self._model("image")
        pixels = []
        for image in images:
            if isinstance(image, Path) and not image.is_file():
                raise ImageLoadError(f"query image {image}: no such file")
            pixels.append(preprocess(image))
        return encode_images(model, torch.stack(pixels))

    def search(
        self,
        query: Any,
        k: int = 10,
        where: str | None = None,
        *,
        in_dir: str | os.PathLike[str] | None = None,
        after: date | datetime | None = None,
        before: date | datetime | None = None,
        threshold: float | None = None,
        ensemble: bool = False,
        templates: Sequence[str] = IMAGENET_TEMPLATES,
        metadata: bool = True,
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
            threshold: drop results with a cosine similarity below it.
            ensemble: embed texts as the mean over CLIP's prompt templates.
            templates: the templates for `ensemble`.
            metadata: False when only path and score are needed (each result's metadata then holds just its
                `id`): an unfiltered search then runs on the saved index and paths alone whenever the store
                has not changed since they were saved, without opening the store (a faster start).

        Returns:
            `SearchResult(path, score, rank, metadata)` records, best first.
        """
        self._check_searchable()
        condition = build_filter(where, in_dir=in_dir, after=after, before=before)
        if not metadata and condition is None:
            saved = self._saved_index()
            if saved is not None:
                vector = self.encode(query, ensemble=ensemble, templates=templates)
                return search_saved(saved, vector, k, threshold=threshold)
        store = self._searchable_store()
        vector = self.encode(query, ensemble=ensemble, templates=templates)
        results = search(store, self.ann_index(), vector, k, where=condition, threshold=threshold)
        if not results and in_dir is not None:
            _check_folder(store, in_dir)
        return results

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
    ) -> list[SearchResult]:
        """The images most like the image at `path`, inside the store or not (itself excluded when inside).

        An indexed, unchanged file uses its stored vector; any other file is read and embedded.

        Raises:
            ImageLoadError: the file is missing or not a readable image.
            QueryError: `path` is an http(s) URL.
        """
        refuse_urls(os.fspath(path))
        path = Path(path).expanduser()
        if not path.is_file():
            raise ImageLoadError(f"{path}: no such file")
        self._check_searchable()
        self._model("image")  # before the store: its identity then comes from the tower a re-encode needs
        store = self._searchable_store()
        row_id = store.id_for_path(path)
        vector = self._stored_vector(store, row_id, path) if row_id is not None else None
        if vector is None:
            vector = self._encode_images([path])[0]
        condition = build_filter(where, in_dir=in_dir, after=after, before=before)
        exclude = [row_id] if row_id is not None else []
        results = search(store, self.ann_index(), vector, k, where=condition, threshold=threshold, exclude=exclude)
        if not results and in_dir is not None:
            _check_folder(store, in_dir)
        return results

    @staticmethod
    def _stored_vector(store: Store, row_id: int, path: Path) -> np.ndarray | None:
        """The stored vector of `path` if the file is unchanged since it was indexed (same size and mtime)."""
        row = store.rows([row_id], columns=["size", "mtime", "vector"])[0]
        stat = path.stat()
        stored_us = (row["mtime"] - _EPOCH) // timedelta(microseconds=1)  # the store returns microseconds
        unchanged = row["size"] == stat.st_size and stored_us == stat.st_mtime_ns // 1000
        return row["vector"] if unchanged else None

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
