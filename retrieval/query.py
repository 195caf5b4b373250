"""Queries: search results, query terms (texts, images, vectors) and their weighted combination, CLIP's
prompt templates, SQL filters, and the search itself over a store and its FAISS index.

One query's path: `parse_terms` turns `"2:golden retriever" + ./pool.jpg - night` into weighted terms;
`encode_query` embeds each term (through encoder callables, so this module never loads a model) and
combines them into one unit vector; `search` looks it up in the FAISS index, restricted to the ids an SQL
filter allows, and reads the hits' metadata from the store.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np

from retrieval.errors import ImageLoadError, QueryError, StoreError
from retrieval.regions import Region, StoredImage
from retrieval.types import Embeddings, RowIds

if TYPE_CHECKING:
    from retrieval.ann import SavedIndex
    from retrieval.faiss_index import AnnIndex
    from retrieval.row_cache import RowCache
    from retrieval.store import Store
    from retrieval.views import ViewIndex, ViewMatrix

logger = logging.getLogger(__name__)

# Extensions that make an existing file a query image rather than text (case-insensitive).
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".avif"}
)

# The start of a weighted term: a decimal number (no exponent, no inf/nan) and a colon, as in `-0.5:night`.
WEIGHT_PREFIX = re.compile(r"([-+]?(?:\d+(?:\.\d*)?|\.\d+)):")
# A web address in a query, which a user may expect to be fetched like a query image.
_URL = re.compile(r"https?://", re.IGNORECASE)

# The 80 prompt templates CLIP's authors used for zero-shot ImageNet (Radford et al. 2021, the
# "Prompt_Engineering_for_ImageNet" notebook). Averaging a label's embeddings over them is "prompt ensembling".
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)
# The 7 of them the same notebook found to do about as well as all 80 (chosen by sequential selection).
SHORT_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


class SearchResult(NamedTuple):
    """One hit of a search."""

    path: str  # the image file (exact file system path)
    score: float  # cosine similarity to the query, in [-1, 1]
    rank: int  # 1 for the best hit
    metadata: dict[str, Any]  # the store's other columns for this image (id, size, width, taken_at, ...)
    weak: bool = False  # below the query's relevance cutoff, returned only when weak results are asked for


TermKind = Literal["text", "image", "vector", "concept"]
# A learned concept in a query: `@rex` (see `retrieval.concepts`), alone or before a text ("@rex on a beach").
CONCEPT_TERM = re.compile(r"@([A-Za-z][A-Za-z0-9_]*)(?:\s+(.*))?", re.DOTALL)


@dataclass(frozen=True)
class Term:
    """One weighted part of a combined query."""

    weight: float  # negative weights subtract the term
    kind: TermKind
    value: Any  # text: str; image: a path or a PIL image; vector: [D] float array; concept: its name


def is_image_path(text: str | os.PathLike[str]) -> bool:
    """True for an existing file with an image extension: such a query term is an image, anything else text."""
    path = Path(os.fspath(text)).expanduser()
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def _split_weight(token: str) -> tuple[float, str]:
    """`"2:golden retriever"` -> (2.0, "golden retriever"); anything else, `"16:9 screenshot"` too, stays text.

    Only a number, a colon, and then a letter or an image file name make a weight: a text that merely
    starts with digits and a colon (an aspect ratio, a time of day) must be searched as written.
    """
    match = WEIGHT_PREFIX.match(token)
    if match is None:
        return 1.0, token
    weight, rest = float(match.group(1)), token[match.end() :]
    if np.isfinite(weight) and (rest[:1].isalpha() or rest[:1] == "@" or Path(rest).suffix.lower() in IMAGE_EXTENSIONS):
        return weight, rest
    return 1.0, token


def refuse_urls(text: str) -> None:
    """Refuse a query holding an http(s) URL: images are read from files only.

    Raises:
        QueryError: a word of `text` is a URL; the message says to download the image first.
    """
    url = next((word for word in text.split() if _URL.match(word)), None)
    if url is not None:
        raise QueryError(f"query term {url}: URLs are not fetched; download the image first and give its path")


def _term_for(text: str, weight: float) -> Term:
    """A text or image term for one written term."""
    refuse_urls(text)
    concept = CONCEPT_TERM.fullmatch(text.strip())
    if concept is not None and not concept.group(2):
        return Term(weight, "concept", concept.group(1))
    if is_image_path(text):
        return Term(weight, "image", Path(text).expanduser())
    if Path(text).suffix.lower() in IMAGE_EXTENSIONS and os.sep in text and " " not in text:
        raise ImageLoadError(f"query image {text}: no such file")
    return Term(weight, "text", text)


def _terms_for(text: str, weight: float) -> list[Term]:
    """`_term_for`, with a leading concept split off: "@rex on a beach" -> @rex + "on a beach", both weighted."""
    concept = CONCEPT_TERM.fullmatch(text.strip())
    if concept is not None and concept.group(2):
        return [Term(weight, "concept", concept.group(1)), _term_for(concept.group(2), weight)]
    return [_term_for(text, weight)]


def parse_terms(tokens: Sequence[str]) -> list[Term]:
    """Parse a command-line query into weighted terms.

    Grammar: terms separated by `+` or `-` (a `-` subtracts the next term); each term may start with a
    weight, `W:term` where W is a number and the term starts with a letter or names an image file
    (`2:golden retriever`, `-0.5:night`, `0.5:pool.jpg`), which also starts a new term (anything else with a
    colon is text: `16:9 screenshot`, `time: 10:30`); an existing file
    with an image extension is an image, `@name` is a learned concept (`retrieval.concepts`; a text after it
    in the same term is a term of its own, `@rex on a beach`), anything else is text. Other words not separated
    by an operator belong to one text, so `clipsearch query red circle` searches for "red circle". Terms side
    by side add up.

    Args:
        tokens: the query's command-line arguments, e.g. `("2:golden retriever", "+", "./pool.jpg", "-", "night")`.

    Returns:
        The terms, in order.

    Raises:
        QueryError: an empty query, an operator with no term after it, or an http(s) URL (never fetched).
        ImageLoadError: a term that is a path to an image file (`./photos/x.jpg`) which does not exist.
    """
    terms: list[Term] = []
    sign, weight = 1.0, 1.0
    words: list[str] = []
    pending_operator: str | None = None

    def flush() -> None:
        nonlocal words, weight, sign
        if words:
            terms.extend(_terms_for(" ".join(words), sign * weight))
        words, weight, sign = [], 1.0, 1.0

    for token in tokens:
        if token in ("+", "-"):
            flush()
            sign, pending_operator = (1.0 if token == "+" else -1.0), token
            continue
        pending_operator = None
        if not token.strip():
            continue
        token_weight, rest = (1.0, token) if is_image_path(token) else _split_weight(token)
        if is_image_path(rest):  # an image is a term of its own
            term_sign = sign
            flush()
            terms.append(Term(term_sign * token_weight, "image", Path(rest).expanduser()))
            continue
        if rest is not token:  # a weight prefix starts a new term
            term_sign = sign
            flush()
            sign = term_sign
        if not words:
            weight, token = token_weight, rest
        words.append(token)
    flush()
    if pending_operator is not None:
        raise QueryError(f'the query ends with {pending_operator!r}; put a term after it, e.g. `- "night"`')
    if not terms:
        raise QueryError('empty query; give a text or an image path, e.g. clipsearch query "a photo of a dog"')
    return terms


def as_terms(query: Any) -> list[Term]:
    """Terms from what the Python API accepts as a query.

    Args:
        query: a text (or an image path given as str), a `Path`, a PIL image, a [D] vector, a `Term`, a stored
            image or a region of an image (`retrieval.regions`), or a list mixing those and `(weight, any of
            those)` tuples.

    Raises:
        QueryError: an unsupported query type, an empty list, or an http(s) URL (never fetched).
    """
    if isinstance(query, list | tuple) and not (
        isinstance(query, tuple) and len(query) == 2 and isinstance(query[0], int | float)
    ):
        terms = [term for item in query for term in as_terms(item)]
        if not terms:
            raise QueryError("empty query list; give at least one text, image or vector")
        return terms
    weight = 1.0
    if isinstance(query, tuple):
        weight, query = float(query[0]), query[1]
    if isinstance(query, Term):
        return [Term(weight * query.weight, query.kind, query.value)]
    if isinstance(query, StoredImage | Region):  # image terms the caller's `encode_images` resolves
        return [Term(weight, "image", query)]
    if isinstance(query, str):
        if not query.strip():
            raise QueryError("empty query text")
        return _terms_for(query, weight)
    if isinstance(query, os.PathLike):
        return [Term(weight, "image", Path(query).expanduser())]
    if isinstance(query, np.ndarray):
        return [Term(weight, "vector", query)]
    if hasattr(query, "getpixel"):  # a PIL image, without importing PIL for text queries
        return [Term(weight, "image", query)]
    raise QueryError(f"unsupported query {type(query).__name__}; give a text, a path, a PIL image or a vector")


def ensemble_prompts(text: str, templates: Sequence[str] = IMAGENET_TEMPLATES) -> list[str]:
    """The text placed in every template ("a photo of a {}." -> "a photo of a dog.")."""
    return [template.format(text) for template in templates]


def _unit(vector: np.ndarray) -> np.ndarray:
    """The vector scaled to length 1."""
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm < 1e-6:
        raise QueryError("the query's terms cancel out (their weighted sum is zero); change the weights")
    return (vector / norm).astype(np.float32)


def encode_query(
    terms: Sequence[Term],
    encode_texts: Callable[[list[str]], Embeddings],
    encode_images: Callable[[list[Any]], Embeddings],
    ensemble: bool = False,
    templates: Sequence[str] = IMAGENET_TEMPLATES,
) -> np.ndarray:
    """Embed the terms and combine them: the weighted sum of their unit vectors, renormalised.

    Args:
        terms: from `parse_terms` or `as_terms`.
        encode_texts: texts -> [N, D] unit rows (called once, for all texts; not called without texts).
        encode_images: image paths or PIL images -> [N, D] unit rows (not called without images).
        ensemble: embed each text as the normalised mean over `templates` (CLIP's prompt ensembling).
        templates: the templates for `ensemble`.

    Returns:
        [D] float32, L2-normalised.

    Raises:
        QueryError: the weighted sum is zero, or a vector term has the wrong shape.
    """
    concepts = [t.value for t in terms if t.kind == "concept"]
    if concepts:
        raise QueryError(f"concept term @{concepts[0]} must be resolved first (retrieval.concepts.resolve_terms)")
    vectors: list[np.ndarray | None] = [None] * len(terms)
    texts = [(i, t.value) for i, t in enumerate(terms) if t.kind == "text"]
    if texts:
        if ensemble:
            prompts = [p for _, text in texts for p in ensemble_prompts(text, templates)]
            per_text = encode_texts(prompts).reshape(len(texts), len(templates), -1)  # [T, templates, D]
            embedded = [_unit(rows.mean(axis=0)) for rows in per_text]
        else:
            embedded = list(encode_texts([text for _, text in texts]))
        for (i, _), vector in zip(texts, embedded, strict=True):
            vectors[i] = vector
    images = [(i, t.value) for i, t in enumerate(terms) if t.kind == "image"]
    if images:
        for (i, _), vector in zip(images, encode_images([image for _, image in images]), strict=True):
            vectors[i] = vector
    for i, term in enumerate(terms):
        if term.kind == "vector":
            vectors[i] = _unit(np.asarray(term.value, dtype=np.float32).reshape(-1))
    dims = {v.shape[-1] for v in vectors}
    if len(dims) != 1:
        raise QueryError(f"query vectors of different lengths {sorted(dims)}; a vector term must match the model")
    total = sum(term.weight * vector for term, vector in zip(terms, vectors, strict=True))
    return _unit(np.asarray(total, dtype=np.float32))


def _sql_string(text: str) -> str:
    """A SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def _sql_timestamp(moment: date | datetime) -> str:
    """A SQL timestamp literal (dates mean their midnight)."""
    if not isinstance(moment, datetime):
        moment = datetime(moment.year, moment.month, moment.day)
    return f"TIMESTAMP '{moment.replace(tzinfo=None).isoformat(sep=' ')}'"


def build_filter(
    where: str | None = None,
    in_dir: str | os.PathLike[str] | None = None,
    after: date | datetime | None = None,
    before: date | datetime | None = None,
) -> str | None:
    """One LanceDB SQL filter from the query options (None when there is nothing to filter).

    Args:
        where: any SQL filter over the store's columns, e.g. `"format = 'PNG' AND width > 1000"`.
        in_dir: only images under this folder (recursively).
        after: only images whose EXIF capture time (`taken_at`) is at or after this moment.
        before: only images captured strictly before this moment.
    """
    clauses = []
    if in_dir is not None:
        from retrieval.store import display_path  # here: the store module imports LanceDB (~1 s)

        folder = os.path.join(os.path.abspath(os.path.expanduser(in_dir)), "")  # trailing /: /a/b, not /a/bc
        clauses.append(f"starts_with(path, {_sql_string(display_path(folder))})")
    if after is not None:
        clauses.append(f"taken_at >= {_sql_timestamp(after)}")
    if before is not None:
        clauses.append(f"taken_at < {_sql_timestamp(before)}")
    if where is not None and where.strip():
        clauses.append(f"({where})")
    return " AND ".join(clauses) if clauses else None


def search(
    store: Store,
    index: AnnIndex,
    vector: np.ndarray,
    k: int = 10,
    where: str | None = None,
    threshold: float | None = None,
    exclude: Sequence[int] | RowIds = (),
    views: ViewIndex | ViewMatrix | None = None,
) -> list[SearchResult]:
    """The k stored images nearest to a query vector.

    Args:
        store: the open store.
        index: its FAISS index, up to date (`retrieval.ann.open_index`).
        vector: [D] unit query vector.
        k: results wanted.
        where: a LanceDB SQL filter (`build_filter`); k results come back whenever k rows match.
        threshold: drop results whose cosine similarity is below it.
        exclude: ids never to return (the query image itself in `similar`).
        views: the store's sub-views (`retrieval.views`): an image then scores the best of its whole-image and
            view scores, and a result whose view won has that view's box as `metadata["view"]`.

    Returns:
        Best first, ranks from 1; fewer than k when fewer match.

    Raises:
        QueryError: an invalid filter.
    """
    if k <= 0:
        return []
    exclude = np.asarray(exclude, dtype=np.int64)
    allowed = store.filter_ids(where) if where else None
    if allowed is not None and len(exclude):
        allowed = np.setdiff1d(allowed, exclude)
    fetch = k + (len(exclude) if allowed is None else 0)
    scores, ids = index.search(vector.reshape(1, -1), fetch, allowed=allowed)
    hits = [
        (int(i), float(s))
        for i, s in zip(ids[0], scores[0], strict=True)
        if i >= 0 and i not in exclude and (threshold is None or s >= threshold)
    ][:k]
    won: dict[int, Any] = {}
    if views is not None:
        hits, won = _with_views(store, index, views, vector, hits, k, allowed, exclude, threshold)
        hits = hits[:k]
    if not hits:
        return []
    rows = _rows(store, [i for i, _ in hits])
    results = []
    for i, score in hits:
        row = rows.get(i)
        if row is None:  # deleted by a concurrent indexer after the index was synced
            continue
        if i in won:
            row["view"] = list(won[i])
        results.append(SearchResult(path=row.pop("path"), score=score, rank=len(results) + 1, metadata=row))
    return results


def _with_views(
    store: Store,
    index: AnnIndex,
    views: ViewIndex | ViewMatrix,
    vector: np.ndarray,
    hits: list[tuple[int, float]],
    want: int,
    allowed: RowIds | None,
    exclude: RowIds,
    threshold: float | None,
) -> tuple[list[tuple[int, float]], dict[int, Any]]:
    """`hits` rescored with the sub-views (`retrieval.views.merge_views`), cut at the threshold."""
    from retrieval.views import merge_views

    held = np.sort(index.ids())  # views of images the index does not hold (yet, or any more) never count
    held = held if allowed is None else np.intersect1d(held, allowed)
    held = np.setdiff1d(held, exclude) if len(exclude) else held
    merged, won = merge_views(
        hits, views, vector, want, lambda ids: np.isin(ids, held), lambda ids: store.vectors_for(ids) @ vector
    )
    return [(i, s) for i, s in merged if threshold is None or s >= threshold], won


class SearchPage(NamedTuple):
    """One page of a ranking."""

    results: list[SearchResult]  # ranks offset + 1, offset + 2, ...
    offset: int  # results of the ranking skipped before this page
    next_offset: int | None  # the next page's offset; None on the last page
    total: int  # images the search ranked: those the filter lets through (or all), less the excluded ones
    cutoff: float | None = None  # the score below which results are weak (left out, or marked); inf: no good match


def search_page(
    store: Store,
    index: AnnIndex,
    vector: np.ndarray,
    k: int = 10,
    offset: int = 0,
    where: str | None = None,
    threshold: float | None = None,
    exclude: Sequence[int] | RowIds = (),
    row_cache: RowCache | None = None,
    views: ViewIndex | ViewMatrix | None = None,
    cutoff: Callable[[list[float]], float] | None = None,
    show_weak: bool = False,
) -> SearchPage:
    """Results `offset + 1 .. offset + k` of the ranking `search` makes, for paging through it.

    Pages fit together without duplicates or gaps: each page is cut from one ranking of the first
    `offset + k + 1` results (exact for the flat and IVF indexes, whose scan does not depend on how many results
    are asked for), ordered by score and then by id, and a group of equal scores at the cut is always fetched
    whole, so ties land on the same side of it on every page. The extra result tells whether a next page exists.

    Args:
        store: the open store.
        index: its FAISS index, up to date.
        vector: [D] unit query vector.
        k: results per page (> 0).
        offset: results to skip (>= 0).
        where: a LanceDB SQL filter (`build_filter`).
        threshold: drop results whose cosine similarity is below it.
        exclude: ids never to return.
        row_cache: where to read the hits' metadata (a long-lived reader's copy); None reads the store.
        views: the store's sub-views, as for `search`.
        cutoff: the relevance cutoff as a function of the ranking's best scores (its `PRESENT_HITS` best;
            `threshold="auto"` of
            `clipsearch.Library`): results below it are left out, so every page is cut at the same score.
        show_weak: keep the results below `cutoff`, marked `weak`.

    Raises:
        QueryError: k or offset out of range, or an invalid filter.
    """
    from retrieval.relevance import PRESENT_HITS  # here: relevance builds on this module's records

    if k <= 0 or offset < 0:
        raise QueryError(f"k must be at least 1 and offset at least 0, got k={k}, offset={offset}")
    exclude = np.unique(np.asarray(exclude, dtype=np.int64))
    allowed = store.filter_ids(where) if where else None
    if allowed is not None:
        allowed = np.setdiff1d(allowed, exclude, assume_unique=True)
        total = len(allowed)
    else:
        total = max(len(index) - len(exclude), 0)
    want = offset + k + 1
    if cutoff is not None:  # the cutoff weighs the best few hits, however few a page shows
        want = max(want, PRESENT_HITS)
    # one more than wanted, so that one search usually shows the last one wanted is not tied with the next
    fetch = want + 1 + (len(exclude) if allowed is None else 0)
    excluded = set(exclude.tolist())
    while True:
        scores, ids = index.search(vector.reshape(1, -1), fetch, allowed=allowed)
        found = [(i, s) for i, s in zip(ids[0].tolist(), scores[0].tolist(), strict=True) if i >= 0]
        hits = [(i, s) for i, s in found if i not in excluded and (threshold is None or s >= threshold)]
        if len(found) < fetch or (threshold is not None and found[-1][1] < threshold):
            break  # nothing more to find
        if len(hits) >= want and found[-1][1] < hits[want - 1][1]:
            break  # every result tied with the last one wanted is in
        fetch *= 2
    hits.sort(key=lambda hit: (-hit[1], hit[0]))
    won: dict[int, Any] = {}
    if views is not None:
        hits, won = _with_views(store, index, views, vector, hits, want, allowed, exclude, threshold)
    bar = cutoff([s for _, s in hits[:PRESENT_HITS]]) if cutoff is not None and hits else None
    if bar is not None and not show_weak:
        hits = [(i, s) for i, s in hits if s >= bar]
    page = hits[offset : offset + k]
    next_offset = offset + k if len(hits) > offset + k else None
    page_ids = [i for i, _ in page]
    rows = (row_cache.rows(page_ids) if row_cache is not None else _rows(store, page_ids)) if page else {}
    results = []
    for position, (i, score) in enumerate(page, start=offset + 1):
        row = rows.get(i)
        if row is not None:  # None: deleted by a concurrent indexer after the index was synced
            if i in won:
                row = {**row, "view": list(won[i])}
            weak = bar is not None and score < bar
            results.append(SearchResult(path=row.pop("path"), score=score, rank=position, metadata=row, weak=weak))
    return SearchPage(results, offset, next_offset, total, bar)


def search_saved(
    saved: SavedIndex,
    vector: np.ndarray,
    k: int = 10,
    threshold: float | None = None,
    views: ViewIndex | None = None,
) -> list[SearchResult]:
    """`search` without filters through a saved index and its paths alone (`retrieval.ann.open_saved_index`),
    never opening the store: each result's metadata holds only its `id` (and `view`, as in `search`).

    Args:
        saved: a saved index known to reflect the store's current state.
        vector: [D] unit query vector.
        k: results wanted.
        threshold: drop results whose cosine similarity is below it.
        views: the saved views index (`retrieval.views.open_saved_view_index`), known to reflect the views
            table's current state: an image then scores the best of its whole-image and view scores.

    Returns:
        Best first, ranks from 1; fewer than k when the store holds fewer images.
    """
    if k <= 0:
        return []
    scores, ids = saved.index.search(vector.reshape(1, -1), k)
    hits = [(i, s) for i, s in zip(ids[0].tolist(), scores[0].tolist(), strict=True) if i >= 0]
    won: dict[int, Any] = {}
    if views is not None:
        from retrieval.views import merge_views

        def held(image_ids: np.ndarray) -> np.ndarray:  # views of images the image index does not hold never count
            return np.array([saved.paths.get(int(i)) is not None for i in image_ids], bool)

        def image_scores(image_ids: list[int]) -> np.ndarray:
            found_scores, found = saved.index.search(vector.reshape(1, -1), len(image_ids), allowed=image_ids)
            by_id = dict(zip(found[0].tolist(), found_scores[0].tolist(), strict=True))
            return np.array([by_id.get(i, -np.inf) for i in image_ids], np.float32)

        hits, won = merge_views(hits, views, vector, k, held, image_scores)
        hits = hits[:k]
    results = []
    for i, score in hits:
        path = saved.paths.get(i) if threshold is None or score >= threshold else None
        if path is not None:
            metadata: dict[str, Any] = {"id": i, **({"view": list(won[i])} if i in won else {})}
            results.append(SearchResult(path=path, score=score, rank=len(results) + 1, metadata=metadata))
    return results


def _rows(store: Store, ids: list[int]) -> dict[int, dict[str, Any]]:
    """Metadata rows by id, leaving out ids that have just left the store."""
    try:
        rows = store.rows(ids)
    except StoreError:
        present = set(store.filter_ids(f"id IN ({', '.join(str(i) for i in ids)})").tolist())
        rows = store.rows([i for i in ids if i in present])
    return {int(row["id"]): row for row in rows}
