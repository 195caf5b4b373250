"""The served query text encoder: `clipsearch serve` warms up a bfloat16 text tower with prepacked weights
(`retrieval.model.prepacked`); its vectors must be the bfloat16 copy's, within bfloat16 rounding of float32."""

from __future__ import annotations

import numpy as np
import torch

from clipsearch.library import Library
from retrieval.model.encode import encode_texts
from retrieval.model.loading import load_model
from retrieval.model.prepacked import PackedLinear, PackedSelfAttention, prepacked_text_model
from retrieval.model.query_text import MAX_QUERY_THREADS, encode_query_texts, query_text_model, query_threads
from retrieval.shapes import generate

TEXTS = ["a red circle", "two blue squares on a white background", "x", "a photo of a dog on the beach"]
NATIVE = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def packed_layers(model) -> int:
    return sum(isinstance(m, PackedLinear | PackedSelfAttention) for m in model.modules())


def test_prepacked_weights_give_the_bfloat16_copys_vectors():
    model, _ = load_model("shapes-mini", device="cpu", towers="text")
    fast = query_text_model(model)
    packed = prepacked_text_model(fast)
    if not NATIVE:  # no bfloat16 copy to pack: the model is used as it is
        assert packed is fast is model
        return
    assert packed is not fast and packed.info == fast.info
    # per block: the attention with its two projections, and the MLP's two layers
    assert packed_layers(packed) == 5 * len(fast.transformer.resblocks)
    assert packed_layers(fast) == 0  # the copy it was made from is untouched
    exact = encode_texts(model, TEXTS)
    bfloat16 = encode_query_texts(fast, TEXTS)
    for texts in ([TEXTS[3]], TEXTS):  # one text, as a server encodes it, and a batch of different lengths
        got = encode_query_texts(packed, texts)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, bfloat16[-len(texts) :], rtol=0, atol=1e-6)  # the same bfloat16 maths
        assert (np.sum(exact[-len(texts) :] * got, axis=1) > 0.999).all()  # bfloat16 rounding of float32
    assert prepacked_text_model(model) is model  # float32 is left alone


def test_a_warmed_up_server_library_searches_with_the_packed_copy(tmp_path):
    generate(tmp_path / "photos", 6, seed=3, size_range=(64, 96))
    Library(db=tmp_path / "db", model="shapes-mini").index([tmp_path / "photos"], workers=0, progress=False)
    served = Library(db=tmp_path / "db", model="shapes-mini", row_cache=True)  # as `clipsearch serve` has it
    assert served.warm_up() == 6
    assert (packed_layers(served._query_text_model) > 0) == NATIVE
    exact = Library(db=tmp_path / "db", model="shapes-mini", text_precision="float32")
    for text in TEXTS:
        assert float(served.encode(text) @ exact.encode(text)) > 0.999
    page = served.search_page("a red circle", k=6, threshold=None)
    assert [r.path for r in page.results] == [r.path for r in served.search("a red circle", k=6)]


def test_a_query_uses_a_second_thread_only_on_an_idle_core():
    # /proc/loadavg's fourth field counts the tasks running or waiting to run now, the caller included
    assert query_threads("0.10 0.20 0.30 1/250 4321", cores=2) == 2  # the other core is idle
    assert query_threads("1.90 1.80 1.70 2/250 4321", cores=2) == 1  # something else runs on it
    assert query_threads("3.00 3.00 3.00 6/250 4321", cores=2) == 1
    assert query_threads("0.10 0.20 0.30 1/250 4321", cores=16) == MAX_QUERY_THREADS  # a few rows gain no more
    assert query_threads("0.10 0.20 0.30 1/250 4321", cores=1) == 1
    assert query_threads("", cores=2) == 1  # a format it does not know: one thread, as everywhere but Linux
    assert 1 <= query_threads() <= MAX_QUERY_THREADS  # this machine's own


def test_two_threads_give_one_threads_query_vectors():
    model, _ = load_model("shapes-mini", device="cpu", towers="text")
    packed = prepacked_text_model(query_text_model(model))
    previous = torch.get_num_threads()
    try:
        by_threads = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            by_threads[threads] = encode_texts(packed, TEXTS)
    finally:
        torch.set_num_threads(previous)
    # the same products, split differently between threads: equal up to the order of a few bfloat16 sums
    assert (np.sum(by_threads[1] * by_threads[2], axis=1) > 0.9999).all()
