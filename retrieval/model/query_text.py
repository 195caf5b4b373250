"""Query texts to vectors, tuned for the shape of a query: a handful of short texts, one at a time.

Two ways: the model's text tower in torch, or, without importing torch at all, a fresh export of it
(`onnx_text_encoder`): CLIP's or MobileCLIP2's text tower in numpy over memory-mapped weights (`numpy_text`), else
its ONNX graph in ONNX Runtime. That is what lets a one-shot `clipsearch query` start in a fraction of torch's import
time.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from retrieval.cores import available_cores

if TYPE_CHECKING:
    from retrieval.model.clip import CLIP
    from retrieval.model.identity import ModelInfo
    from retrieval.model.numpy_text import NumpyTextEncoder
    from retrieval.model.onnx_runtime import OnnxEncoder
    from retrieval.types import Embeddings

logger = logging.getLogger(__name__)

# Up to this many texts are encoded on few threads (`query_threads`): a short query's matrices are too small for
# many intra-op threads to pay off, and on shared cores each op's thread barrier can wait a whole time slice
# (measured on 2 busy cores: ViT-B/32 text tower, one query, 600 ms on 2 threads against 100 ms on 1).
FEW_TEXTS = 8
# A few texts use at most this many threads, and only cores nothing else is waiting for (`query_threads`).
MAX_QUERY_THREADS = 2


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
    """Embed query texts; a handful of them on one torch thread, or two when a core is idle (`query_threads`)."""
    import torch

    from retrieval.model.encode import encode_texts

    if len(texts) > FEW_TEXTS:
        return encode_texts(model, texts)
    previous = torch.get_num_threads()
    torch.set_num_threads(min(previous, query_threads()))
    try:
        return encode_texts(model, texts)
    finally:
        torch.set_num_threads(previous)


def query_threads(loadavg: str | None = None, cores: int | None = None) -> int:
    """The threads to encode a few query texts on: one, and one more per core that nothing else is running or
    waiting for right now, up to `MAX_QUERY_THREADS`.

    One short query reads every weight of the text tower once (76 MB for ViT-B/32's in bfloat16), so a second
    thread on an idle core adds its memory bandwidth: served text searches on a quiet 2-core Xeon took 17.2-22.7
    ms (p50 of 150, two runs) instead of 29.4-31.6 on one thread, interleaved. On a core something else wants, the
    threads' barriers wait for time slices: beside two busy processes of the same priority, encoding one query took
    98 ms p50 and 678 ms p90 on two threads against 25 and 39 on one. So the count follows how many tasks can run at
    this instant (the fourth field of Linux's /proc/loadavg, which counts the caller itself); elsewhere it is one
    thread.

    Args:
        loadavg: the text of /proc/loadavg (read when None).
        cores: the cores this process may run on (its CPU affinity when None).
    """
    try:
        if loadavg is None:
            with open("/proc/loadavg", encoding="ascii") as file:
                loadavg = file.read()
        runnable = int(loadavg.split()[3].split("/")[0])  # "0.52 0.58 0.59 2/304 8123": 2 running or runnable
        cores = cores if cores is not None else available_cores()
    except (OSError, ValueError, IndexError, AttributeError):  # not Linux, or a format this does not know
        return 1
    return max(1, min(MAX_QUERY_THREADS, cores - runnable + 1))


def onnx_text_encoder(info: ModelInfo, texts: int) -> NumpyTextEncoder | OnnxEncoder | None:
    """The text tower of a fresh export of the model `info` identifies, without torch: in numpy (`numpy_text`: CLIP's
    and MobileCLIP2's towers; nothing to build, the weights are memory-mapped) where there is one, else its ONNX
    export opened in ONNX Runtime; None when there is no fresh export (a stale one is never used), or the model's
    tokenizer is not CLIP's (a hub tokenizer's file comes with the torch checkpoint).

    Args:
        info: the model's identity, e.g. as the store records it.
        texts: how many texts the first call encodes: up to `FEW_TEXTS` run on one thread.
    """
    if info.tokenizer != "clip-bpe":
        return None
    from retrieval.model.numpy_text import NumpyTextEncoder, find_numpy_text

    folder = find_numpy_text(info)
    if folder is not None:
        return NumpyTextEncoder.open(folder)
    from retrieval.model.onnx_runtime import OnnxEncoder, find_export

    export = find_export(info, towers="text")
    if export is None:
        return None
    return OnnxEncoder.open(export, towers="text", threads=1 if texts <= FEW_TEXTS else None)


def encode_onnx_query_texts(encoder: NumpyTextEncoder | OnnxEncoder, texts: list[str]) -> Embeddings:
    """Embed query texts with an `onnx_text_encoder`: CLIP's tokens (over-long texts cut, with a warning)."""
    from retrieval.model.tokenizer import tokenize

    warn_if_cut(texts, encoder.context_length)
    return encoder.encode_texts(tokenize(texts, context_length=encoder.context_length, truncate=True))


def export_text_tower(model: CLIP) -> None:
    """Export the loaded text tower to ONNX, so the next one-shot query runs without torch; a model that cannot be
    exported, or a cache dir that cannot be written, only costs later queries that shortcut (logged)."""
    from retrieval.errors import ExportError
    from retrieval.model.onnx_export import ensure_export

    try:
        ensure_export(model, "float32")
    except (ExportError, OSError) as e:
        logger.info("no ONNX export of %s's text tower (%s); queries keep using torch", model.info.name, e)


def warn_if_cut(texts: list[str], context_length: int) -> None:
    """Say once, for all the texts of a query, that the text encoder will not see the end of one of them."""
    from retrieval.model.tokenizer import token_count

    if any(token_count(text) > context_length for text in texts):
        logger.warning(
            "the query text is longer than the model's %d tokens; only the first part is used", context_length
        )
