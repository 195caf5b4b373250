"""Decoder worker processes that survive bad files.

A plain `multiprocessing.Pool` loses the task of a worker that dies (the run hangs) and a
`ProcessPoolExecutor` breaks entirely. Here each worker has its own pipe and at most `prefetch` tasks, so
when one dies (a segfault in a codec, an out-of-memory kill) or hangs past the timeout, the file it was on
is known: it is reported as failed, the worker's other tasks are re-sent, and a fresh worker takes its place.

A background thread does all pipe traffic and buffers finished images; the bounded buffer stops dispatching
when the encoder falls behind. `paused()` holds the workers between files while the caller encodes on the CPU
with torch.

The timeout counts the time a worker runs or waits on something (a read, a lock, a sleep), not the time it is ready
to run but waiting for a core (Linux's /proc/PID/schedstat; elsewhere wall time): a file that hangs is caught after
the timeout however busy the machine, and one that only waits for other processes to leave it a core is not.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from indexer.decode import DecodeResult, DecodeTask, Failed
from indexer.workers import exit_with_parent, lower_priority, worker_context
from retrieval.errors import IndexingError

logger = logging.getLogger(__name__)

_DONE = object()
_READY = "ready"
_POLL_SECONDS = 0.5  # how often a waiting dispatcher looks at timeouts and the stop flag
_MAX_STARTUP_DEATHS = 3  # workers dying before they are ready: they cannot start, so give up
_GATE_POLL_SECONDS = 0.01  # how often a held worker looks whether it may go on (a CPU batch takes ~1 s)
# Modules a worker has no use for, each seconds to import and hundreds of MB per process: a worker says at start-up
# which of them it holds (logged at debug level), so a change that drags one in shows.
HEAVY_MODULES = ("torch", "lancedb", "onnxruntime")


def _worker_main(
    conn: multiprocessing.connection.Connection,
    decoder: Callable[[DecodeTask], DecodeResult],
    gate: ctypes.c_bool,
) -> None:
    """A worker's loop: receive (seq, task), wait for the gate to be open, send (seq, result); until told to stop."""
    # Ctrl-C, or a `kill` sent to the whole process group (`timeout`, systemd), is the main process's to handle:
    # it stops the workers once it has saved its work. Nor can they outlive it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    exit_with_parent()
    lower_priority()
    # the decoder unpickled: from now on a death is the current file's fault
    conn.send((_READY, [name for name in HEAVY_MODULES if name in sys.modules]))
    while True:
        try:
            item = conn.recv()
        except (EOFError, OSError):
            return
        if item is None:
            return
        seq, task = item
        while not gate.value:  # held by `DecoderPool.paused`
            time.sleep(_GATE_POLL_SECONDS)
        try:
            result = decoder(task)
        except Exception as e:  # a decoder bug must cost one file, not the worker
            result = Failed("decode", f"unexpected error: {type(e).__name__}: {e}")
        conn.send((seq, result))


def _crash_reason(exitcode: int | None) -> str:
    """How a worker ended, in words: "decoder worker crashed (SIGSEGV)"."""
    if exitcode is not None and exitcode < 0:
        try:
            return f"decoder worker crashed ({signal.Signals(-exitcode).name})"
        except ValueError:
            pass
    return f"decoder worker crashed (exit code {exitcode})"


class _Gate:
    """Lets the workers start files, or holds them; its clock stands still while they are held, so the time a
    worker waits at the gate never counts towards the per-file timeout."""

    def __init__(self, ctx: multiprocessing.context.BaseContext) -> None:
        # A shared flag the workers poll, not a multiprocessing.Event: setting an Event waits for every process
        # asleep on it to wake, so one killed while waiting (an out-of-memory kill) would hang the indexer.
        self.open = ctx.RawValue(ctypes.c_bool, True)  # True: workers may start their next file
        self._lock = threading.Lock()  # the holding thread and the dispatcher both read the times
        self._held_seconds = 0.0  # time held before the current hold
        self._held_since: float | None = None  # start of the current hold

    def hold(self) -> None:
        """Hold the workers before their next file."""
        with self._lock:
            self.open.value = False
            if self._held_since is None:
                self._held_since = time.monotonic()

    def release(self) -> None:
        """Let the workers go on (a no-op when they are not held)."""
        with self._lock:
            if self._held_since is not None:
                self._held_seconds += time.monotonic() - self._held_since
                self._held_since = None
            self.open.value = True

    def clock(self) -> float:
        """Seconds on a clock that runs only while the workers are let go."""
        with self._lock:
            now = time.monotonic()
            held = self._held_seconds + (now - self._held_since if self._held_since is not None else 0.0)
        return now - held


def _runqueue_seconds(pid: int) -> float:
    """Seconds the process's main thread has spent ready to run but waiting for a core; 0.0 where unknown."""
    try:
        with open(f"/proc/{pid}/schedstat", "rb") as f:  # "<ns on a core> <ns waiting for one> <time slices>"
            return int(f.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


class _Worker:
    """One worker process, its pipe, and the tasks it holds (oldest first)."""

    def __init__(self, ctx: multiprocessing.context.BaseContext, decoder: Callable, gate: _Gate) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=_worker_main, args=(child, decoder, gate.open), daemon=True, name="clipsearch-decoder"
        )
        self.process.start()
        child.close()
        self.gate = gate
        self.inflight: collections.deque[tuple[int, DecodeTask]] = collections.deque()
        self.busy_since = self.clock()
        self.ready = False  # set once the process has started and unpickled the decoder

    def clock(self) -> float:
        """Seconds on a clock that stands still while the workers are held and while this one waits for a core."""
        return self.gate.clock() - _runqueue_seconds(self.process.pid)

    def send(self, seq: int, task: DecodeTask) -> None:
        """Hand over a task; the clock starts when it is the worker's current one."""
        if not self.inflight and self.ready:
            self.busy_since = self.clock()
        self.inflight.append((seq, task))
        self.conn.send((seq, task))

    def stop(self, kill: bool = False) -> None:
        """End the process (politely unless `kill`) and close the pipe."""
        if kill:
            self.process.kill()
        else:
            try:
                self.conn.send(None)
            except OSError:
                pass
        self.process.join(timeout=2)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


class DecoderPool:
    """Decode tasks in worker processes, replacing workers that crash or hang.

    Args:
        decoder: picklable callable run in the workers (an `indexer.decode.Decoder`).
        workers: number of processes (>= 1).
        prefetch: tasks queued per worker, so it never waits for the next one.
        buffer: finished results held while the consumer is busy.
        timeout: seconds one file may take before its worker is killed and the file reported (time the workers
            spend held by `paused()`, or waiting for a core on a busy machine, does not count).
    """

    def __init__(
        self,
        decoder: Callable[[DecodeTask], DecodeResult],
        workers: int,
        prefetch: int = 2,
        buffer: int = 64,
        timeout: float = 120.0,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.decoder = decoder
        self.n_workers = workers
        self.prefetch = prefetch
        self.timeout = timeout
        self.restarts = 0
        self._ctx = worker_context()
        self._out: queue.Queue = queue.Queue(maxsize=buffer)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._workers: list[_Worker] = []
        self._startup_deaths = 0
        self._gate = _Gate(self._ctx)

    def imap_unordered(self, tasks: Iterable[DecodeTask]) -> Iterator[tuple[DecodeTask, DecodeResult]]:
        """Yield (task, result) for every task, in completion order. Close the pool when done."""
        self._thread = threading.Thread(target=self._dispatch, args=(iter(tasks),), daemon=True)
        self._thread.start()
        while True:
            item = self._out.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Hold the workers between files for the duration (a file already being decoded is finished).

        On a CPU whose cores the encoder uses all of, decoding alongside it does not come for free: every
        preemption of one of its threads stalls the others at the next synchronisation point. Decoding in the
        encoder's pauses instead gives each the whole machine in turn.
        """
        self._gate.hold()
        try:
            yield
        finally:
            self._gate.release()

    def close(self) -> None:
        """Stop the dispatcher and every worker."""
        self._gate.release()  # a worker waiting at the gate must get to its stop message
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():  # unblock a dispatcher waiting to put into a full buffer
                try:
                    self._out.get_nowait()
                except queue.Empty:
                    self._thread.join(timeout=0.05)
        for worker in self._workers:
            worker.stop(kill=bool(worker.inflight))
        self._workers.clear()

    def __enter__(self) -> DecoderPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _put(self, item: object) -> bool:
        """Buffer an item for the consumer, giving up when the pool is closing."""
        while not self._stop.is_set():
            try:
                self._out.put(item, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def _dispatch(self, tasks: Iterator[DecodeTask]) -> None:
        """The background thread: feed workers, collect results, replace dead or hung workers."""
        try:
            self._workers = [_Worker(self._ctx, self.decoder, self._gate) for _ in range(self.n_workers)]
            retry: collections.deque[DecodeTask] = collections.deque()
            exhausted = False
            seq = 0
            while not self._stop.is_set():
                for worker in self._workers:
                    while len(worker.inflight) < self.prefetch and (retry or not exhausted):
                        task = retry.popleft() if retry else next(tasks, None)
                        if task is None:
                            exhausted = True
                            break
                        seq += 1
                        worker.send(seq, task)
                if exhausted and not retry and not any(w.inflight for w in self._workers):
                    self._put(_DONE)
                    return
                ready = multiprocessing.connection.wait(
                    [w.conn for w in self._workers] + [w.process.sentinel for w in self._workers],
                    timeout=_POLL_SECONDS,
                )
                for i, worker in enumerate(list(self._workers)):
                    if worker.conn in ready:
                        try:
                            message = worker.conn.recv()
                        except (EOFError, OSError):
                            worker.process.join(timeout=1)
                            self._replace(i, retry, _crash_reason(worker.process.exitcode))
                            continue
                        if message[0] == _READY:
                            logger.debug(
                                "decoder worker %d ready after %.2f s; heavy modules loaded: %s",
                                worker.process.pid,
                                worker.clock() - worker.busy_since,
                                ", ".join(message[1]) or "none",
                            )
                            worker.ready = True
                            worker.busy_since = worker.clock()
                            continue
                        _, result = message
                        _, task = worker.inflight.popleft()
                        worker.busy_since = worker.clock()
                        if not self._put((task, result)):
                            return
                    elif worker.process.sentinel in ready:
                        worker.process.join()
                        self._replace(i, retry, _crash_reason(worker.process.exitcode))
                    elif worker.inflight and worker.clock() - worker.busy_since > self.timeout:
                        self._replace(i, retry, f"decoding took longer than {self.timeout:g} s")
        except BaseException as e:  # hand any dispatcher failure to the consumer instead of hanging it
            self._put(e)

    def _replace(self, i: int, retry: collections.deque[DecodeTask], reason: str) -> None:
        """Report the dead or hung worker's current file, re-queue its other tasks and start a fresh worker."""
        worker = self._workers[i]
        worker.stop(kill=True)
        if not worker.ready:  # it never got to a file: nobody to blame, and maybe no worker can start
            self._startup_deaths += 1
            if self._startup_deaths >= _MAX_STARTUP_DEATHS:
                raise IndexingError(
                    f"decoder worker processes die at start-up ({reason}); run with --workers 0 to decode in "
                    "the main process and see the error"
                )
            retry.extendleft(reversed([task for _, task in worker.inflight]))
        elif worker.inflight:
            _, culprit = worker.inflight.popleft()
            retry.extend(task for _, task in worker.inflight)
            logger.info("%s: %s", culprit.path, reason)  # the run's summary lists it, once
            self._put((culprit, Failed("worker", reason)))
        self.restarts += 1
        self._workers[i] = _Worker(self._ctx, self.decoder, self._gate)
