"""Decoder worker processes run below the encoder's priority, starting their server early leaves this process's
priority alone, `DecoderPool.paused()` holds them (for a torch encoder on the CPU; beside ONNX Runtime they decode
while it encodes), and the decode timeout counts neither a pause nor a wait for a core.

The pause tests hold the workers from before they start and let them go when the test says so: a worker's
start-up, and every decode, may take any time on a busy machine, so no assertion here races the wall clock.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from test_index_support import NicenessDecoder, tiny_model, vectors_by_path, write_images

from indexer.decode import Decoder, DecodeResult, DecodeTask, Failed
from indexer.options import IndexOptions
from indexer.pipeline import index_folders
from indexer.pool import DecoderPool
from indexer.workers import WORKER_NICENESS, start_worker_server
from retrieval.model.encode import choose_encoder
from retrieval.model.onnx_runtime import OnnxEncoder
from retrieval.store import Store

PATIENCE = 120.0  # seconds a test waits for something that takes milliseconds on an idle machine


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


@dataclass(frozen=True)
class GoDecoder(Decoder):
    """Marks a file as begun (`<file>.begun`), then finishes it only once a file `go` exists beside it."""

    def __call__(self, task: DecodeTask):
        Path(task.path + ".begun").touch()
        go = Path(task.path).parent / "go"
        while not go.exists():
            time.sleep(0.005)
        return Failed("worker", "done")


class Consumer:
    """Takes a pool's results in a background thread, so the test thread stays free to pause and resume."""

    def __init__(self, pool: DecoderPool, paths: Iterable[Path]) -> None:
        self.results: list[tuple[DecodeTask, DecodeResult]] = []
        self.error: BaseException | None = None
        results = pool.imap_unordered(DecodeTask(str(p)) for p in paths)
        self._thread = threading.Thread(target=self._take, args=(results,), daemon=True)
        self._thread.start()

    def _take(self, results: Iterable[tuple[DecodeTask, DecodeResult]]) -> None:
        try:
            self.results.extend(results)
        except BaseException as e:  # handed to the test thread by `finish`
            self.error = e

    def finish(self) -> list[str]:
        """Wait for the last result; the reasons of all of them."""
        self._thread.join(PATIENCE)
        assert not self._thread.is_alive(), f"the pool did not finish within {PATIENCE:g} s"
        if self.error is not None:
            raise self.error
        return [result.reason for _, result in self.results]


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Poll until `condition()` holds; fail after `PATIENCE` seconds."""
    deadline = time.monotonic() + PATIENCE
    while not condition():
        assert time.monotonic() < deadline, f"waited {PATIENCE:g} s for {what}"
        time.sleep(0.01)


def workers_ready(pool: DecoderPool, n: int) -> Callable[[], bool]:
    """Whether the pool has started `n` workers and each has said it is ready."""
    return lambda: len(pool._workers) == n and all(w.ready for w in pool._workers)


def test_paused_workers_start_no_file_until_resumed(tmp_path):
    _, preprocess = tiny_model()
    paths = write_images(tmp_path, 12)

    def begun() -> int:
        return len(list(tmp_path.glob("*.begun")))

    with DecoderPool(GoDecoder(preprocess), workers=2) as pool:
        with pool.paused():
            consumer = Consumer(pool, paths)
            wait_until(workers_ready(pool, 2), "both workers to start")
            time.sleep(0.2)  # time for a wrongly released worker to begin a file
            assert begun() == 0
        wait_until(lambda: begun() == 2, "each worker to begin a file")
        with pool.paused():
            (tmp_path / "go").touch()
            # A file already under way when the pause began is finished ...
            wait_until(lambda: len(consumer.results) == 2, "the two files under way to finish")
            time.sleep(0.2)
            assert begun() == 2  # ... and no other starts until the pause ends.
        reasons = consumer.finish()
    assert len(reasons) == len(paths) and begun() == len(paths)  # nothing lost


def test_time_held_by_a_pause_does_not_count_towards_the_timeout(tmp_path):
    _, preprocess = tiny_model()
    paths = write_images(tmp_path, 8)
    with DecoderPool(ClockDecoder(preprocess), workers=2, timeout=0.5) as pool:
        with pool.paused():  # from before the workers start: their start-up is not timed either
            consumer = Consumer(pool, paths)
            wait_until(workers_ready(pool, 2), "both workers to start")  # each holding two files
            time.sleep(1.5)  # three timeouts at the gate: a wait there is not a hung decoder
            assert pool.restarts == 0 and consumer.results == []
            # What remains is decoding, at whatever pace this machine allows; only the wait was under test.
            pool.timeout = PATIENCE
        reasons = consumer.finish()
        assert pool.restarts == 0
    assert len(reasons) == len(paths) and not [r for r in reasons if "longer than" in r]


def test_a_worker_killed_while_held_is_replaced_and_nothing_hangs(tmp_path):
    _, preprocess = tiny_model()
    paths = write_images(tmp_path, 8)
    with DecoderPool(ClockDecoder(preprocess), workers=2) as pool:
        with pool.paused():
            consumer = Consumer(pool, paths)
            wait_until(workers_ready(pool, 2), "both workers to start")  # each waits at the gate with two files
            victim = pool._workers[0].process  # as the out-of-memory killer would pick it
            victim.kill()
            victim.join()
        reasons = consumer.finish()  # resuming returns, and every file comes back
        assert pool.restarts == 1
    assert len(reasons) == len(paths)
    assert [r for r in reasons if "crashed" in r] == ["decoder worker crashed (SIGKILL)"]  # the file it held


@dataclass(frozen=True)
class StarvedDecoder(Decoder):
    """On "busy" files: moves to the core `cpu` at niceness `niceness` and computes for 0.3 s of CPU time there; on
    "hang" files: never returns."""

    cpu: int = 0
    niceness: int = 19

    def __call__(self, task: DecodeTask):
        if "hang" in task.path:
            time.sleep(3600)
        os.sched_setaffinity(0, {self.cpu})
        os.nice(max(0, self.niceness - os.nice(0)))
        start = time.thread_time()
        while time.thread_time() - start < 0.3:
            pass
        return Failed("worker", "computed")


def test_a_worker_waiting_for_a_core_is_not_timed_out_but_a_hang_is(tmp_path):
    # A process computing without pause on the same core, 9 steps of niceness above the worker, leaves it about a
    # tenth of that core (CFS and EEVDF share a core by weight, 1.25x per step), so the worker takes about 3 s of
    # wall time or more for 0.3 s of work: a wall-clock timeout of 1 s killed it. Waiting for a core is not hanging.
    cpu = min(os.sched_getaffinity(0))
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(hog.pid, {cpu})
        _, preprocess = tiny_model()
        paths = [tmp_path / "busy-1.png", tmp_path / "busy-2.png", tmp_path / "hang.png"]
        with DecoderPool(
            StarvedDecoder(preprocess, cpu=cpu, niceness=min(19, os.nice(0) + 9)), workers=1, timeout=1.0
        ) as pool:
            with pool.paused():  # the worker's start-up (importing this module) is not under test
                consumer = Consumer(pool, paths)
                wait_until(workers_ready(pool, 1), "the worker to start")
            consumer.finish()
        results = {Path(task.path).name: result.reason for task, result in consumer.results}
    finally:
        hog.kill()
        hog.wait()
    assert results == {
        "busy-1.png": "computed",
        "busy-2.png": "computed",
        "hang.png": "decoding took longer than 1 s",  # sleeping is not waiting for a core: a hang is still caught
    }
    assert pool.restarts == 1


OVERLAP_WAIT = 30.0  # seconds an encoder call waits for a decoder to start a file meanwhile


@dataclass(frozen=True)
class OverlapDecoder(Decoder):
    """Notes in `folder` whether it started a file while the encoder was running (`folder/encoding` exists)."""

    folder: str = ""

    def __call__(self, task: DecodeTask):
        if (Path(self.folder) / "encoding").exists():
            (Path(self.folder) / "decoded-while-encoding").touch()
        return super().__call__(task)


class OverlapEncoder(OnnxEncoder):
    """An ONNX Runtime encoder that marks its runs in `folder/encoding` and, in its first two, waits (at most
    OVERLAP_WAIT s) for a decoder to start a file before encoding."""

    folder: Path
    waits = 2

    def encode_images(self, pixels):
        marker, seen = self.folder / "encoding", self.folder / "decoded-while-encoding"
        marker.touch()
        try:
            deadline = time.monotonic() + OVERLAP_WAIT
            while self.waits and not seen.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            self.waits = max(0, self.waits - 1)
            return super().encode_images(pixels)
        finally:
            marker.unlink()


def test_workers_decode_while_onnx_runtime_encodes_and_store_the_same_vectors(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPSEARCH_EXPORTS", str(tmp_path / "exports"))
    model, preprocess = tiny_model()
    plain = choose_encoder(model, "image")
    assert isinstance(plain, OnnxEncoder)
    encoder = OverlapEncoder(plain.info, plain.sessions, plain.context_length)
    encoder.folder = tmp_path
    write_images(tmp_path / "photos", 40)
    options = IndexOptions(workers=2, batch_size=4, progress=False)
    decoder = OverlapDecoder(preprocess, folder=str(tmp_path))
    overlapped = Store.open(tmp_path / "overlapped", plain.info, create=True)
    assert index_folders([tmp_path / "photos"], encoder, preprocess, overlapped, options, decoder).indexed == 40
    assert (tmp_path / "decoded-while-encoding").exists()  # the workers were not held while the encoder ran
    # The same rows and vectors as decoding and encoding in turn, in this process.
    alone = Store.open(tmp_path / "alone", plain.info, create=True)
    index_folders([tmp_path / "photos"], plain, preprocess, alone, dataclasses.replace(options, workers=0))
    got, expected = vectors_by_path(overlapped), vectors_by_path(alone)
    assert sorted(got) == sorted(expected) and len(got) == 40
    assert max(float(np.abs(got[p] - expected[p]).max()) for p in expected) < 1e-5
