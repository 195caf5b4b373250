"""Decoder worker processes run below the encoder's priority, and starting their server early leaves this
process's priority alone."""

from __future__ import annotations

import itertools
import os

from test_index_support import NicenessDecoder, tiny_model, write_images

from indexer.decode import Decoded, Decoder, DecodeTask
from indexer.pool import DecoderPool
from indexer.workers import WORKER_NICENESS, start_worker_server


def test_workers_run_at_a_lower_priority_than_the_encoder(tmp_path):
    before = os.nice(0)
    start_worker_server()
    assert os.nice(0) == before
    _, preprocess = tiny_model()
    paths = write_images(tmp_path, 4)
    with DecoderPool(NicenessDecoder(preprocess), workers=2) as pool:
        reasons = {result.reason for _, result in pool.imap_unordered(DecodeTask(str(p)) for p in paths)}
    assert reasons == {f"niceness {max(before, WORKER_NICENESS)}"}


def test_the_pool_says_when_nothing_is_decoded_yet(tmp_path):
    _, preprocess = tiny_model()
    paths = write_images(tmp_path, 6)
    idle = object()
    with DecoderPool(Decoder(preprocess), workers=2) as pool:
        items = list(pool.imap_unordered((DecodeTask(str(p)) for p in paths), idle=idle))
    results = [item for item in items if item is not idle]
    assert items[0] is idle  # the workers had not even started when it was first asked
    assert sorted(task.path for task, _ in results) == sorted(map(str, paths))
    assert all(isinstance(result, Decoded) for _, result in results)
    assert all(a is not idle or b is not idle for a, b in itertools.pairwise(items))  # once per wait, no busy loop
    with DecoderPool(Decoder(preprocess), workers=1) as pool:  # without `idle`: results only
        assert len(list(pool.imap_unordered(DecodeTask(str(p)) for p in paths))) == len(paths)
