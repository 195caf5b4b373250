"""Decoder worker processes run below the encoder's priority, and starting their server early leaves this
process's priority alone."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from test_index_support import NicenessDecoder, tiny_model, write_images

from indexer.decode import Decoder, DecodeTask, Failed
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


@dataclass(frozen=True)
class ClockDecoder(Decoder):
    """Reports when it started on a file (as a `Failed` reason), after taking a little while on it."""

    def __call__(self, task: DecodeTask):
        started = time.time()
        time.sleep(0.02)
        return Failed("worker", repr(started))


def test_paused_workers_start_no_file_until_resumed(tmp_path):
    _, preprocess = tiny_model()
    paths = write_images(tmp_path, 12)
    with DecoderPool(ClockDecoder(preprocess), workers=2) as pool:
        results = pool.imap_unordered(DecodeTask(str(p)) for p in paths)
        starts = [float(next(results)[1].reason)]  # the workers are up and busy
        with pool.paused():
            paused_at = time.time()
            time.sleep(0.5)
            resumed_at = time.time()
        starts += [float(result.reason) for _, result in results]
    assert len(starts) == len(paths)  # nothing lost
    # A file already under way when the pause began is finished; no other starts until the pause ends.
    assert not [t for t in starts if paused_at + 0.05 < t < resumed_at]
    assert sum(t >= resumed_at for t in starts) >= len(paths) - 4  # the rest wait (two per worker were under way)


def test_time_held_by_a_pause_does_not_count_towards_the_timeout(tmp_path):
    _, preprocess = tiny_model()
    paths = write_images(tmp_path, 8)
    with DecoderPool(ClockDecoder(preprocess), workers=2, timeout=0.5) as pool:
        results = pool.imap_unordered(DecodeTask(str(p)) for p in paths)
        reasons = [next(results)[1].reason]  # the workers are up, each holding more files
        with pool.paused():
            time.sleep(1.5)  # three timeouts long: a wait at the gate is not a hung decoder
        reasons += [result.reason for _, result in results]
        assert pool.restarts == 0
    assert len(reasons) == len(paths) and not [r for r in reasons if "longer than" in r]


def test_a_worker_killed_while_held_is_replaced_and_nothing_hangs(tmp_path):
    _, preprocess = tiny_model()
    paths = write_images(tmp_path, 8)
    with DecoderPool(ClockDecoder(preprocess), workers=2) as pool:
        results = pool.imap_unordered(DecodeTask(str(p)) for p in paths)
        reasons = [next(results)[1].reason]
        with pool.paused():
            time.sleep(0.1)  # the file under way is done: the worker waits at the gate
            victim = pool._workers[0].process  # as the out-of-memory killer would pick it
            victim.kill()
            victim.join()
        reasons += [result.reason for _, result in results]  # resuming returns, and every file comes back
        assert pool.restarts == 1
    assert len(reasons) == len(paths)
    assert [r for r in reasons if "crashed" in r] == ["decoder worker crashed (SIGKILL)"]  # the file it held
