"""The web app: a Starlette app over one `Library`, serving a JSON API and one page (`clipsearch serve`).

Routes parse a request, call the `Library`, and shape JSON; they have no search logic of their own. Every
error is a JSON object `{"error": "<one line saying what to do>"}` with a 4xx status (400 bad parameter, 401
token missing or wrong, 403 foreign Origin, 404 unknown id or upload, 413 too large, 415 not an image, 421
foreign Host), 503 when the store cannot be read, and 500 `{"error": "internal error; see the server's log"}`
for anything unexpected (the traceback goes to the log only). See `clipsearch/web/security.py` for the Host,
Origin and token rules and the headers every response carries (`Server-Timing: app;dur=<ms>` among them).

API reference (shapes are stable; fields may be added, never renamed or removed):

`GET /api/search` — a search whose whole state fits in a URL (what the page puts in its own address):
    q=TEXT          a text query
    like=ID         "more like this": a stored image's id (from a hit's `id`)
    upload=UPLOAD   an uploaded image's id (from `POST /api/uploads`)
    box=x0,y0,x1,y1 only a region of the `like` or `upload` image: fractions of its upright width and height,
                    0 <= x0 < x1 <= 1, 0 <= y0 < y1 <= 1, origin top left
    k=50            results per page, 1..500
    offset=0        results to skip, 0..10000 (take `next_offset` of the previous page)
    in=FOLDER       only images under a folder: a root's `name` from `/api/status`, optionally followed by
                    `/sub/folder` inside it (no `..`)
    after=DATE, before=DATE   only images taken (EXIF) at/after, or before, YYYY-MM-DD or YYYY-MM-DDTHH:MM[:SS]
    where=SQL       a LanceDB SQL filter over the store's columns but the paths, e.g. `format = 'PNG' AND width > 1000`
    threshold=auto  where the matches end: `auto` (the default for a query of texts alone) is the calibrated
                    per-query cutoff of `clipsearch.Library.search(threshold="auto")`, which answers nothing when no
                    image is a good match; a number (a cosine from -1 to 1; for a lone `@name` probe concept, a
                    probability) drops the results below it; `none` (the default for any query with an image)
                    keeps the whole ranking. `auto` for a query with an image or a concept is a 400.
    weak=1          keep the results below the cutoff too, each marked `"weak": true` (default 0)
  At least one of q, like and upload; given together, their unit vectors are summed (each weight 1). A text may
  name a learned concept: `@rex`, or `@rex on a beach` (the concept plus the text, as `clipsearch query`); an
  unknown name is a 400 listing the known ones (see `/api/concepts`).

`POST /api/search` — a weighted combination, as JSON (Content-Type: application/json, at most 1 MB):
    {"terms": [{"text": "a dog", "weight": 1},
               {"id": "123", "box": [0.1, 0.1, 0.5, 0.5], "weight": 1},
               {"upload": "u...", "weight": -0.5}],
     "k": 50, "offset": 0, "in": "Pictures/2023", "after": "2023-01-01", "before": "2024-01-01", "where": "...",
     "threshold": "auto", "weak": false}
  Each term has exactly one of text, id, upload; `weight` (default 1, may be negative) and `box` (a list of four
  numbers or "x0,y0,x1,y1", not with text) are optional. The query vector is the weighted sum of the terms' unit
  vectors, renormalised, as for `clipsearch query "2:a dog" + photo.jpg - "0.5:night"`.

  Both answer 200:
    {"results": [HIT, ...], "offset": 0, "k": 50, "next_offset": 50 or null, "total_hint": 1234,
     "threshold": "auto" or 0.25 or null, "cutoff": 0.8312 or null, "no_good_match": false}
  where HIT is
    {"id": "123", "rank": 1, "score": 0.3127, "root": "Pictures", "path": "2023/beach.jpg",
     "width": 4000, "height": 3000, "format": "JPEG", "taken_at": "2023-06-01T12:00:00" or null,
     "camera": "Canon EOS 5D Mark IV" or null, "thumb": "/thumb/123", "file": "/file/123", "weak": false}
  and, in a store indexed with --views, "view": [x0, y0, x1, y1] (fractions of the upright image) when one of
  the image's sub-views matched better than the whole image: the region to highlight.
  `id` is the store's row id as a string: stable while the file is unchanged, never reused. `root` is the display
  name of the indexed folder holding the image, `path` its path inside it ("/"-separated); absolute paths are
  never sent. Pages fit together without duplicates or gaps; `next_offset` is null on the last page; `total_hint`
  counts the images ranked (those the filters let through). `threshold` is the one applied, `cutoff` the score
  below which results are weak (null without a threshold, or when nothing was ranked); `no_good_match` is true when
  `auto` found no good match (results are then empty, or all weak with weak=1). Every page of a search is cut at
  the same cutoff (computed from the ranking's best hit). The stored images of a query (`like`, `id` terms) are
  left out of its results. Text queries never fetch anything: a URL is searched for as text.

`POST /api/uploads` — multipart/form-data with the image in the field `image` (at most --max-upload-mb, default
  25 MB; at most the --max-megapixels limit in pixels): 201 {"upload": "u...", "width": W, "height": H,
  "thumb": "/upload-thumb/u..."}. The upload's vector and a copy of at most 1024 px (for boxes) are kept in
  memory, the most recent 32 uploads; an older or unknown upload id answers 404 "upload it again".

`GET /api/concepts` — the personal concepts learned with the served model (`clipsearch learn`, or below):
    {"concepts": [CONCEPT, ...]}, by name, where CONCEPT is
    {"name": "rex", "query": "@rex", "method": "probe" or "coop", "accuracy": 0.93 or null (held out; null when
     too few examples to hold any out), "candidates": {"probe": 0.93, "coop": 0.88} or null (method auto),
     "examples": 12, "negatives": 36, "seed": 0, "created_at": "2026-11-30T19:00:00+00:00"}
`POST /api/concepts` — learn a concept from stored images, as JSON, and save it (replacing one of that name):
    {"name": "rex", "positives": ["12", "15"], "negatives": ["20"], "method": "auto", "seed": 0, "steps": 200}
  `name`: a letter, then letters, digits or _ (at most 64); `positives`: 1 to 1000 image ids; `negatives`
  (optional: sampled from the store, seeded, when absent); `method`: probe (linear probe), coop (learned prompt
  context) or auto (the better held-out accuracy; default); `steps`: CoOp's, 1..2000. Answers 201
  {"concept": CONCEPT} once learned: a probe takes about a second, CoOp seconds, on a worker thread (the event
  loop keeps serving; calls that need the library, searches and thumbnails, wait their turn). A bad name, method
  or list is a 400, an id not in the store a 404. Then search with `q=@rex`.
`DELETE /api/concepts/{name}` — forget a concept: {"removed": "rex"}; an unknown one is a 400 listing the known.

`GET /thumb/{id}` — a WebP of at most 256 px on the long side, EXIF orientation applied, cached on disk under the
  store; `ETag` is the content hash, `Cache-Control: private, max-age=31536000, immutable` (an id's content never
  changes); `If-None-Match` with that ETag answers 304.
`GET /upload-thumb/{upload}` — the same for an upload (ETag the upload id).
`GET /file/{id}` — the original file, with its image type, the same caching headers, and byte ranges.
  Both serve an id only while it is in the store, its file (symlinks resolved) is inside an indexed folder, and
  it still holds the indexed content; otherwise 404. An id is digits only; anything else is 404.

`GET /api/status` — what `clipsearch status --json` says, without absolute paths: {"db": "<store folder name>",
  "model": "<model name>", "images": N, "roots": [{"name": "Pictures"}], "models": [{"model", "table", "count",
  "version", "state", "indexing_pid", "last_run", "ann", "failures": [{"root", "path", "stage", "reason"}]}]}
  (`last_run.roots` lists root names).

`GET /` — `static/index.html`; `GET /static/...` — the page's other files (404 until the page is installed).

Concurrency: `clipsearch index` may run on the same store meanwhile. Each search reads the latest committed state
(the FAISS index is brought up to date when the store's version moved), so new images appear and deleted ones
leave without a restart.
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
import os
import re
import secrets
import threading
from collections import OrderedDict
from collections.abc import Callable
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from clipsearch.web.security import Guard
from clipsearch.web.thumbs import Thumbnails, thumbnail, webp_bytes
from retrieval.errors import ClipsearchError, ImageLoadError, NotFoundError, QueryError, StoreError
from retrieval.query import CONCEPT_TERM, Term, as_terms
from retrieval.regions import Box, Region, StoredImage
from retrieval.roots import display

if TYPE_CHECKING:
    from clipsearch.library import Library
    from retrieval.concepts import Concept
    from retrieval.query import SearchResult
    from retrieval.roots import Roots

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
MAX_K = 500
MAX_OFFSET = 10_000
DEFAULT_K = 50
UPLOADS_KEPT = 32  # uploads remembered (LRU), each a vector and a copy of at most UPLOAD_SIDE px: ~100 MB at most
UPLOAD_SIDE = 1024
MAX_JSON_BYTES = 1 << 20
MAX_TEXT = 1000  # characters of a query text: the model reads 77 tokens, and tokenizing more only costs time
IMMUTABLE = "private, max-age=31536000, immutable"
_ID = re.compile(r"[0-9]{1,18}")
_DIGITS = re.compile(r"[0-9]{1,9}")  # ASCII only: str.isdigit() would take "²", which int() refuses
_UPLOAD = re.compile(r"u[A-Za-z0-9_-]{16}")
_PATH_COLUMN = re.compile(r"\bpath(_bytes)?\b", re.IGNORECASE)
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}(T[0-9]{2}:[0-9]{2}(:[0-9]{2})?)?")
_MEDIA_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif",
                "BMP": "image/bmp", "TIFF": "image/tiff", "HEIF": "image/heif", "AVIF": "image/avif"}  # fmt: skip
T = TypeVar("T")


class Upload(NamedTuple):
    """An uploaded query image, kept in memory."""

    vector: np.ndarray  # [D] unit vector of the whole image
    image: Image.Image  # upright RGB, at most UPLOAD_SIDE px: what a box is cut from
    width: int  # the upload's upright size
    height: int
    thumb: bytes  # WebP, at most 256 px


class TooLarge(Exception):
    """A request body over its limit (raised while it streams in)."""


def _error(status: int, message: str) -> JSONResponse:
    """A one-line JSON error."""
    return JSONResponse({"error": message}, status_code=status, headers={"cache-control": "no-store"})


def _json(data: Any, status: int = 200) -> JSONResponse:
    """A JSON answer that is never cached (a search's answer changes as the store does)."""
    return JSONResponse(data, status_code=status, headers={"cache-control": "no-store"})


def _int(params: Any, name: str, default: int, low: int, high: int) -> int:
    """An integer parameter within [low, high]."""
    value = params.get(name, default)
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and _DIGITS.fullmatch(value))):
        raise QueryError(f"{name} must be a whole number from {low} to {high}, got {value!r}")
    number = int(value)
    if not low <= number <= high:
        raise QueryError(f"{name} must be from {low} to {high}, got {number}")
    return number


def _date(params: Any, name: str) -> datetime | None:
    """A date parameter (YYYY-MM-DD, optionally THH:MM[:SS]), or None."""
    value = params.get(name)
    if value in (None, ""):
        return None
    if not isinstance(value, str) or not _DATE.fullmatch(value):
        raise QueryError(f"{name} must be a date like 2023-06-01 (or 2023-06-01T18:30), got {value!r}")
    try:
        return datetime.fromisoformat(value)
    except ValueError as e:
        raise QueryError(f"{name}: {value!r} is not a real date") from e


def _text(params: Any, name: str) -> str | None:
    """An optional text parameter."""
    value = params.get(name)
    if value is not None and not isinstance(value, str):
        raise QueryError(f"{name} must be text, got {value!r}")
    return value or None


def _where(params: Any) -> str | None:
    """The SQL filter parameter, refused when it names the path columns: their values (and the errors a filter
    over them can raise) are absolute paths, which the API never hands out."""
    where = _text(params, "where")
    if where is not None and _PATH_COLUMN.search(where):
        raise QueryError("where cannot use the path columns; filter folders with `in` (a root name and a folder)")
    return where


def _text_terms(text: str, weight: float) -> list[Term]:
    """The terms of a query text: a learned concept `@name`, optionally followed by a text ("@rex on a beach"),
    or a text; never read as a path to an image or a URL to fetch."""
    if len(text) > MAX_TEXT:
        raise QueryError(f"the query text is {len(text)} characters long; keep it under {MAX_TEXT}")
    concept = CONCEPT_TERM.fullmatch(text.strip())
    if concept is None:
        return [Term(weight, "text", text)]
    rest = [Term(weight, "text", concept.group(2))] if concept.group(2) else []
    return [Term(weight, "concept", concept.group(1)), *rest]


def _threshold(params: Any, terms: list[Any]) -> float | str | None:
    """The relevance threshold: a number, "auto" or "none"; by default "auto" for a query of texts alone (the
    calibrated cutoff, `clipsearch.Library.search`) and none for any other."""
    value = params.get("threshold")
    if value in (None, ""):
        return "auto" if all(term.kind == "text" for term in as_terms(terms)) else None
    if value in ("auto", "none"):
        return None if value == "none" else value
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not -1 <= number <= 1:
        raise QueryError(f"threshold must be a cosine from -1 to 1, 'auto' or 'none', got {value!r}")
    return number


def _flag(params: Any, name: str) -> bool:
    """A yes/no parameter: 1/true or 0/false (absent: false)."""
    value = params.get(name, False)
    if value in (True, False, "1", "true", "0", "false", ""):
        return value in (True, "1", "true")
    raise QueryError(f"{name} must be 1 or 0 (true or false), got {value!r}")


def _row_id(value: Any) -> int:
    """A stored image id: digits only (404 for anything else, as for an id not in the store)."""
    if not isinstance(value, str | int) or isinstance(value, bool) or not _ID.fullmatch(str(value)):
        raise NotFoundError(f"no image {str(value)[:40]!r}: an image id is the digits of a hit's `id`")
    return int(value)


def _camera(metadata: dict[str, Any]) -> str | None:
    """ "Canon EOS 5D" from make and model, without repeating the make the model already names."""
    make, model = metadata.get("camera_make"), metadata.get("camera_model")
    brand = make.split()[0].lower() if make and make.split() else None
    if brand and model and model.lower().startswith(brand):
        return model
    return " ".join(p for p in (make, model) if p) or None


def _iso(value: Any) -> str | None:
    """A timestamp as ISO 8601."""
    return value.isoformat() if isinstance(value, date | datetime) else None


def _hit(result: SearchResult, roots: Roots) -> dict[str, Any]:
    """One search result as the API shows it: no absolute path."""
    meta = result.metadata
    located = roots.locate(result.path)
    root, path = (located.root, located.path) if located else (None, display(Path(result.path).name))
    row_id = str(meta["id"])
    return {
        "id": row_id,
        "rank": result.rank,
        "score": round(float(result.score), 6),
        "root": root,
        "path": path,
        "width": meta.get("width"),
        "height": meta.get("height"),
        "format": meta.get("format"),
        "taken_at": _iso(meta.get("taken_at")),
        "camera": _camera(meta),
        "thumb": f"/thumb/{row_id}",
        "file": f"/file/{row_id}",
        "weak": result.weak,
        **({"view": meta["view"]} if "view" in meta else {}),  # the sub-view that matched, to highlight
    }


def _etag_matches(request: Request, etag: str) -> bool:
    """Whether `If-None-Match` names `etag` (or `*`)."""
    header = request.headers.get("if-none-match")
    if not header:
        return False
    tags = [t.strip().removeprefix("W/") for t in header.split(",")]
    return "*" in tags or etag in tags


class WebApp:
    """The routes and their state: the library (one lock: it is not thread-safe), uploads, thumbnails."""

    def __init__(self, library: Library, max_upload_mb: float, max_megapixels: float) -> None:
        self.library = library
        self.max_upload_bytes = int(max_upload_mb * (1 << 20))
        self.max_megapixels = max_megapixels
        self.thumbs = Thumbnails(library.db / "thumbs", max_megapixels=max_megapixels)
        self.uploads: OrderedDict[str, Upload] = OrderedDict()
        self.lock = threading.Lock()
        self.thumb_slots = asyncio.Semaphore(2)  # thumbnails decode on at most two threads at once
        self.failure: ClipsearchError | None = None  # why the warm-up failed: every library call then says so

    async def call(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a library call on a worker thread, one at a time."""

        def locked() -> T:
            with self.lock:
                if self.failure is not None:
                    raise StoreError(str(self.failure))
                return function(*args, **kwargs)

        return await run_in_threadpool(locked)

    def warm_up(self, on_ready: Callable[[int | None, ClipsearchError | None], None]) -> threading.Thread:
        """Load the library's parts on a thread of its own, holding the library lock: the page is served at once,
        searches wait until the model, the store and the index are in; then `on_ready(images, error)`."""

        def run() -> None:
            images = None
            with self.lock:  # still held while on_ready runs: a search answered means the server said it is ready
                try:
                    images = self.library.warm_up()
                except ClipsearchError as e:
                    images = _empty_store(self.library)
                    if images is None:
                        self.failure = e
                on_ready(images, self.failure)

        thread = threading.Thread(target=run, name="clipsearch-warm-up", daemon=True)
        thread.start()
        return thread

    # ---- searching -----------------------------------------------------------------------------

    async def search_get(self, request: Request) -> Response:
        """`GET /api/search`: a search from URL parameters."""
        params = request.query_params
        unknown = set(params) - {"q", "like", "upload", "box", "k", "offset", "in", "after", "before", "where",
                                 "threshold", "weak"}  # fmt: skip
        if unknown:
            raise QueryError(f"unknown parameter(s) {sorted(unknown)}; see the API reference in clipsearch/web/app.py")
        box = Box.parse(params["box"]) if params.get("box") else None
        if box is not None and ("like" in params) == ("upload" in params):
            raise QueryError("box needs exactly one image to cut it from: give it with `like` or with `upload`")
        terms: list[Any] = []
        if params.get("q", "").strip():
            terms.extend(_text_terms(params["q"], 1.0))
        if "like" in params:
            terms.append(StoredImage(_row_id(params["like"]), box))
        if "upload" in params:
            terms.append(self._upload_term(params["upload"], box))
        if not terms:
            raise QueryError("give q (a text), like (an image id) or upload (an upload id) to search for")
        return await self._search(terms, params)

    async def search_post(self, request: Request) -> Response:
        """`POST /api/search`: a weighted combination of terms, as JSON."""
        body = await _json_body(request, '{"terms": [{"text": "a dog"}], "k": 50}')
        unknown = set(body) - {"terms", "k", "offset", "in", "after", "before", "where", "threshold", "weak"}
        if unknown:
            raise QueryError(f"unknown field(s) {sorted(unknown)}; see the API reference in clipsearch/web/app.py")
        terms = body.get("terms")
        if not isinstance(terms, list) or not terms or len(terms) > 32:
            raise QueryError('"terms" must be a list of 1 to 32 terms, e.g. [{"text": "a dog", "weight": 1}]')
        return await self._search([part for term in terms for part in self._term(term)], body)

    def _term(self, term: Any) -> list[Any]:
        """The weighted query terms of a JSON term (a text may be `@name` and a text)."""
        if not isinstance(term, dict) or set(term) - {"text", "id", "upload", "box", "weight"}:
            raise QueryError(
                f'a term is {{"text"|"id"|"upload": ..., "weight"?: 1, "box"?: [x0, y0, x1, y1]}}: {term!r}'
            )
        kinds = [key for key in ("text", "id", "upload") if key in term]
        if len(kinds) != 1:
            raise QueryError(f"a term has exactly one of text, id and upload: {term!r}")
        weight = term.get("weight", 1)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
            raise QueryError(f"a term's weight must be a number, got {weight!r}")
        box = Box.parse(term["box"]) if term.get("box") is not None else None
        if kinds == ["text"]:
            if box is not None or not isinstance(term["text"], str) or not term["text"].strip():
                raise QueryError(f"a text term needs a non-empty text and takes no box: {term!r}")
            return _text_terms(term["text"], float(weight))
        if kinds == ["id"]:
            return [(float(weight), StoredImage(_row_id(term["id"]), box))]
        return [(float(weight), self._upload_term(term["upload"], box))]

    def _upload_term(self, upload_id: Any, box: Box | None) -> Any:
        """An upload as a query term: its vector, or the region `box` of its kept copy."""
        upload = self._upload(upload_id)
        return upload.vector if box is None else Region(upload.image, box)

    async def _search(self, terms: list[Any], params: Any) -> Response:
        """Run a search of `terms` with the paging, filter and threshold parameters of `params`, and shape its
        page."""
        k = _int(params, "k", DEFAULT_K, 1, MAX_K)
        offset = _int(params, "offset", 0, 0, MAX_OFFSET)
        after, before = _date(params, "after"), _date(params, "before")
        where, folder = _where(params), _text(params, "in")
        threshold, weak = _threshold(params, terms), _flag(params, "weak")

        def run() -> tuple[Any, Roots]:
            roots = self.library.roots()
            in_dir = roots.folder(folder) if folder else None
            page = self.library.search_page(
                terms, k, offset, where, in_dir=in_dir, after=after, before=before, threshold=threshold, show_weak=weak
            )
            return page, roots

        page, roots = await self.call(run)
        no_match = page.cutoff is not None and math.isinf(page.cutoff)
        return _json(
            {
                "results": [_hit(r, roots) for r in page.results],
                "offset": page.offset,
                "k": k,
                "next_offset": page.next_offset,
                "total_hint": page.total,
                "threshold": threshold,
                "cutoff": None if page.cutoff is None or no_match else round(page.cutoff, 6),
                "no_good_match": no_match,
            }
        )

    # ---- concepts ------------------------------------------------------------------------------

    async def concepts(self, request: Request) -> Response:
        """`GET /api/concepts`: the learned concepts of the model served."""
        return _json({"concepts": [_concept(c) for c in await self.call(self.library.concepts)]})

    async def learn(self, request: Request) -> Response:
        """`POST /api/concepts`: learn a concept from stored images, on a worker thread (CoOp takes seconds)."""
        from retrieval.concepts import METHODS, check_name

        body = await _json_body(request, '{"name": "rex", "positives": ["12", "15"], "method": "auto"}')
        unknown = set(body) - {"name", "positives", "negatives", "method", "seed", "steps"}
        if unknown:
            raise QueryError(f"unknown field(s) {sorted(unknown)}; see the API reference in clipsearch/web/app.py")
        name = body.get("name")
        check_name(name if isinstance(name, str) else "")
        method = body.get("method", "auto")
        if method not in METHODS:
            raise QueryError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        positives, negatives = _ids(body, "positives", required=True), _ids(body, "negatives", required=False)
        seed, steps = _int(body, "seed", 0, 0, 2**31 - 1), _int(body, "steps", 200, 1, 2000)
        concept = await self.call(self.library.learn, name, positives, negatives, method, seed=seed, steps=steps)
        return _json({"concept": _concept(concept)}, status=201)

    async def forget(self, request: Request) -> Response:
        """`DELETE /api/concepts/{name}`: remove a concept."""
        from retrieval.concepts import check_name

        name = check_name(request.path_params["name"])
        await self.call(self.library.forget, name)
        return _json({"removed": name})

    # ---- uploads -------------------------------------------------------------------------------

    def _upload(self, upload_id: Any) -> Upload:
        """A kept upload, marked as recently used."""
        upload = self.uploads.get(upload_id) if isinstance(upload_id, str) else None
        if upload is None:
            raise NotFoundError("unknown or expired upload; upload the image again (the server keeps the last few)")
        self.uploads.move_to_end(upload_id)
        return upload

    async def upload(self, request: Request) -> Response:
        """`POST /api/uploads`: keep an uploaded query image's vector and a small copy."""
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise QueryError("post the image as multipart/form-data in the field `image`")
        try:
            async with _limited(request, self.max_upload_bytes).form(max_files=1, max_fields=4) as form:
                field = form.get("image")
                if not isinstance(field, UploadFile):
                    raise QueryError("post the image as multipart/form-data in the field `image`")
                data = await field.read()
        except TooLarge:
            return _error(413, f"the upload is over the {self.max_upload_bytes >> 20} MB limit (--max-upload-mb)")
        image, width, height, thumb = await run_in_threadpool(self._decode, data)
        vector = await self.call(self.library.encode, image)
        upload_id = "u" + secrets.token_urlsafe(12)
        self.uploads[upload_id] = Upload(vector, image, width, height, thumb)
        while len(self.uploads) > UPLOADS_KEPT:
            self.uploads.popitem(last=False)
        body = {"upload": upload_id, "width": width, "height": height, "thumb": f"/upload-thumb/{upload_id}"}
        return _json(body, status=201)

    def _decode(self, data: bytes) -> tuple[Image.Image, int, int, bytes]:
        """An upload's upright copy of at most UPLOAD_SIDE px, its upright size and a WebP thumbnail."""
        try:
            image = Image.open(io.BytesIO(data))
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise ImageLoadError("the upload is not an image this server can read (JPEG, PNG, WebP, ...)") from e
        width, height = image.size
        if width * height > self.max_megapixels * 1e6:
            raise TooLarge(f"the image is {width}x{height} pixels, above the {self.max_megapixels:g} MP limit")
        if image.getexif().get(0x0112) in (5, 6, 7, 8):  # an EXIF orientation that turns the picture sideways
            width, height = height, width
        try:
            upright = thumbnail(image, UPLOAD_SIDE, self.max_megapixels).convert("RGB")
        except ImageLoadError as e:
            raise ImageLoadError(f"the upload cannot be decoded: {e}") from e
        small = upright.copy()
        small.thumbnail((256, 256), Image.Resampling.LANCZOS)
        return upright, width, height, webp_bytes(small)

    async def upload_thumb(self, request: Request) -> Response:
        """`GET /upload-thumb/{upload}`: an upload's thumbnail."""
        upload_id = request.path_params["upload"]
        if not _UPLOAD.fullmatch(upload_id):
            raise NotFoundError("unknown upload id")
        upload = self._upload(upload_id)
        headers = {"etag": f'"{upload_id}"', "cache-control": IMMUTABLE}
        if _etag_matches(request, headers["etag"]):
            return Response(status_code=304, headers=headers)
        return Response(upload.thumb, media_type="image/webp", headers=headers)

    # ---- files ---------------------------------------------------------------------------------

    async def thumb(self, request: Request) -> Response:
        """`GET /thumb/{id}`: a stored image's thumbnail, made and cached on first request."""
        stored = await self.call(self.library.image_file, _row_id(request.path_params["id"]))
        headers = {"etag": f'"{stored.content_hash}"', "cache-control": IMMUTABLE}
        if _etag_matches(request, headers["etag"]):
            return Response(status_code=304, headers=headers)
        async with self.thumb_slots:
            path = await run_in_threadpool(self.thumbs.get, stored.path, stored.content_hash)
        return FileResponse(path, media_type="image/webp", headers=headers)

    async def file(self, request: Request) -> Response:
        """`GET /file/{id}`: a stored image's original file."""
        stored = await self.call(self.library.image_file, _row_id(request.path_params["id"]))
        headers = {"etag": f'"{stored.content_hash}"', "cache-control": IMMUTABLE}
        if _etag_matches(request, headers["etag"]):
            return Response(status_code=304, headers=headers)
        media_type = _MEDIA_TYPES.get(stored.format or "", "application/octet-stream")
        return FileResponse(
            stored.path,
            media_type=media_type,
            headers=headers,
            filename=display(stored.path.name),  # a name that is not UTF-8 would not fit the header
            content_disposition_type="inline",
        )

    # ---- status and page -----------------------------------------------------------------------

    async def status(self, request: Request) -> Response:
        """`GET /api/status`: the store's status without absolute paths."""
        from indexer.status import store_status

        def run() -> dict[str, Any]:
            roots = self.library.roots()
            report = store_status(self.library.db)
            return _public_status(report, roots, self.library.model_info.name, self.library.store().count())

        return _json(await self.call(run))

    async def page(self, request: Request) -> Response:
        """`GET /`: the page."""
        index = STATIC / "index.html"
        if not index.is_file():
            return _error(404, "the page is not installed; the JSON API is under /api/ (see clipsearch/web/app.py)")
        return FileResponse(index, media_type="text/html", headers={"cache-control": "no-cache"})


def _empty_store(library: Library) -> int | None:
    """0 when the library's store exists but holds no images yet, else None: such a store is served (the page
    says how to fill it, and `clipsearch index` may fill it meanwhile), where a missing or foreign one is not."""
    try:
        return 0 if library.store().count() == 0 else None
    except ClipsearchError:
        return None


def _public_status(report: dict[str, Any], roots: Roots, model: str, images: int) -> dict[str, Any]:
    """`store_status`'s report with every absolute path replaced by a root name and a relative path."""

    def where(path: str) -> dict[str, str | None]:
        located = roots.locate(path)
        return {"root": located.root, "path": located.path} if located else {"root": None, "path": Path(path).name}

    names = dict(zip(roots.paths, roots.names, strict=True))
    models = []
    for entry in report["models"]:
        run = dict(entry["last_run"]) if entry["last_run"] else None
        if run is not None:
            run["roots"] = [names.get(os.path.normpath(r)) or where(r)["path"] for r in run.get("roots", [])]
        failures = [{**where(f["path"]), "stage": f["stage"], "reason": f["reason"]} for f in entry["failures"]]
        models.append({**entry, "last_run": run, "failures": failures})
    return {
        "db": Path(report["db"]).name,
        "model": model,
        "images": images,
        "roots": [{"name": name} for name in roots.names],
        "models": models,
    }


async def _json_body(request: Request, example: str) -> dict[str, Any]:
    """A request's JSON object body (at most MAX_JSON_BYTES; 413 beyond).

    Raises:
        QueryError: a body that is not a JSON object (the message shows `example`).
    """
    try:
        body = await _limited(request, MAX_JSON_BYTES).json()
    except TooLarge:
        raise TooLarge(f"the JSON body is over {MAX_JSON_BYTES >> 20} MB") from None
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the JSON parser goes
        raise QueryError(f"the body must be JSON, e.g. {example}") from None
    if not isinstance(body, dict):
        raise QueryError(f"the body must be a JSON object, e.g. {example}")
    return body


def _ids(body: dict[str, Any], name: str, required: bool) -> list[StoredImage]:
    """A list of stored image ids (each a hit's `id`)."""
    value = body.get(name, [])
    if not isinstance(value, list) or len(value) > 1000 or (required and not value):
        need = "1 to 1000" if required else "at most 1000"
        raise QueryError(f'{name} must be a list of {need} image ids, e.g. ["12", "15"]')
    return [StoredImage(_row_id(i)) for i in value]


def _concept(concept: Concept) -> dict[str, Any]:
    """A learned concept as the API shows it: no vectors, no paths."""
    return {
        "name": concept.name,
        "query": f"@{concept.name}",
        "method": concept.method,
        "accuracy": concept.accuracy,
        "candidates": concept.params.get("candidates"),
        "examples": len(concept.example_ids),
        "negatives": concept.params.get("negatives", len(concept.negative_ids)),
        "seed": concept.seed,
        "created_at": _iso(concept.created_at),
    }


def _limited(request: Request, limit: int) -> Request:
    """The request with a body that raises `TooLarge` as soon as more than `limit` bytes have streamed in."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLarge()
    received = 0

    async def receive() -> dict[str, Any]:
        nonlocal received
        message = await request.receive()
        received += len(message.get("body", b""))
        if received > limit:
            raise TooLarge()
        return message

    return Request(request.scope, receive)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (unknown URL, wrong method, malformed form) as one-line JSON."""
    assert isinstance(exc, HTTPException)
    message = {404: "no such page or endpoint", 405: "method not allowed here"}.get(exc.status_code, str(exc.detail))
    return _error(exc.status_code, message)


async def _unexpected(request: Request, exc: Exception) -> Response:
    """Anything unexpected: logged with its traceback, answered without details."""
    logger.exception("unexpected error answering %s %s", request.method, request.url.path, exc_info=exc)
    return _error(500, "internal error; see the server's log")


def _handler(status: int, db: Path) -> Callable[[Request, Exception], Any]:
    """An exception handler answering with `status` and the error's own one-line message, in which the store's
    absolute path is shortened to its folder name."""

    async def handle(request: Request, exc: Exception) -> Response:
        message = str(exc).splitlines()[0] if str(exc) else "bad request"
        return _error(status, message.replace(str(db), db.name))

    return handle


def create_app(
    library: Library,
    host: str = "127.0.0.1",
    port: int = 8765,
    token: str | None = None,
    max_upload_mb: float = 25,
    max_megapixels: float = 100.0,
) -> Any:
    """The ASGI app serving `library`.

    Args:
        library: the store and model to serve (the caller may warm it up first: `Library.encode`, `ann_index`).
        host: the address the server binds (Host headers are checked against it, see `security.Guard`).
        port: the port it listens on.
        token: the access token every request must carry; needed when `host` is not a loopback address.
        max_upload_mb: the largest upload accepted, enforced while it streams in.
        max_megapixels: the largest upload (and original, for thumbnails) decoded, in pixels.

    Raises:
        ValueError: a non-loopback host without a token, or a malformed token.
    """
    from clipsearch.web.security import is_loopback

    if token is None and not is_loopback(host):
        raise ValueError(f"serving on {host} exposes your photos to the network: set a token (--token)")
    web = WebApp(library, max_upload_mb, max_megapixels)
    routes = [
        Route("/", web.page),
        Route("/api/search", web.search_get, methods=["GET"]),
        Route("/api/search", web.search_post, methods=["POST"]),
        Route("/api/uploads", web.upload, methods=["POST"]),
        Route("/api/status", web.status),
        Route("/api/concepts", web.concepts, methods=["GET"]),
        Route("/api/concepts", web.learn, methods=["POST"]),
        Route("/api/concepts/{name}", web.forget, methods=["DELETE"]),
        Route("/thumb/{id}", web.thumb),
        Route("/file/{id}", web.file),
        Route("/upload-thumb/{upload}", web.upload_thumb),
    ]
    if STATIC.is_dir():  # the page's files; until they are installed, /static/... is a 404 like any unknown URL
        routes.append(Mount("/static", StaticFiles(directory=STATIC), name="static"))
    handlers: dict[Any, Callable[..., Any]] = {
        HTTPException: _http_error,
        QueryError: _handler(400, library.db),
        NotFoundError: _handler(404, library.db),
        TooLarge: _handler(413, library.db),
        ImageLoadError: _handler(415, library.db),
        StoreError: _handler(503, library.db),
        Exception: _unexpected,
    }
    app = Starlette(routes=routes, exception_handlers=handlers)
    app.state.web = web
    return Guard(app, host, port, token)


def start_warm_up(app: Any, on_ready: Callable[[int | None, ClipsearchError | None], None]) -> threading.Thread:
    """Warm up the library of an app from `create_app` in the background (see `WebApp.warm_up`).

    Args:
        app: what `create_app` returned.
        on_ready: called with (number of images, None) when searches can run (0 for a store with no images yet:
            it is served, and searches answer 503 until `clipsearch index` fills it), or (None, the error) when
            they cannot (no store, another model's store, ...); every search then answers 503 with that error.
    """
    return app.app.state.web.warm_up(on_ready)
