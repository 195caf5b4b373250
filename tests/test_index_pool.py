"""Decoder worker processes run below the encoder's priority, and starting their server early leaves this
process's priority alone."""

from __future__ import annotations

import os

from test_index_support import NicenessDecoder, tiny_model, write_images

from indexer.decode import DecodeTask
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
