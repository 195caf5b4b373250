"""Where decoder worker processes come from, kept free of heavy imports so a caller can start it first.

Workers fork from a forkserver: a clean process that has imported the decoding code (Pillow and numpy, never torch
or LanceDB) once, with none of this process's torch or LanceDB threads. Booting it costs an interpreter start plus
those imports (~0.3 s on a 2-core machine), so the CLI starts it before loading the model and the two overlap.

Unlike other multiprocessing children, workers do not run the caller's main script: it may be a script without
an `if __name__ == "__main__":` guard, and a worker only ever receives library objects.
"""

from __future__ import annotations

import io
import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
import os
import sys
import threading
from multiprocessing import reduction, spawn, util
from typing import Any

# Workers yield the CPU to the main process: the file a worker is still finishing when a torch CPU batch starts (the
# pool pauses them for that encoder, `DecoderPool.paused`), and decoding beside ONNX Runtime or a GPU encoder, must
# not hold up the threads that encode, feed the GPU or collect results; a decoder competing with the encoder's
# threads at equal priority stalls all of them at each synchronisation point.
WORKER_NICENESS = 10


def worker_context() -> multiprocessing.context.BaseContext:
    """A forkserver context (preloading the decoder) whose processes skip the main script where available, else
    spawn."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = _WorkerContext()
    ctx.set_forkserver_preload(["indexer.decode"])
    return ctx


def _worker_preparation(name: str) -> dict[str, Any]:
    """What multiprocessing tells a new child about this process, less the main module.

    A child normally runs the parent's `__main__` script again (as `__mp_main__`) so that objects pickled by
    reference to it resolve; a script without an `if __name__ == "__main__":` guard then indexes again in every
    worker, or fails there with "An attempt has been made to start a new process before ... bootstrapping". Workers
    only receive library objects, so they never need it.
    """
    data = spawn.get_preparation_data(name)
    data.pop("init_main_from_name", None)
    data.pop("init_main_from_path", None)
    return data


if sys.platform != "win32":
    from multiprocessing import popen_forkserver

    class _WorkerPopen(popen_forkserver.Popen):
        """`popen_forkserver.Popen`, its `_launch` copied (as of CPython 3.11 to 3.14) but for one line: the
        preparation data come from `_worker_preparation`."""

        def _launch(self, process_obj: Any) -> None:
            prep_data = _worker_preparation(process_obj._name)
            buf = io.BytesIO()
            multiprocessing.context.set_spawning_popen(self)
            try:
                reduction.dump(prep_data, buf)
                reduction.dump(process_obj, buf)
            finally:
                multiprocessing.context.set_spawning_popen(None)
            self.sentinel, w = multiprocessing.forkserver.connect_to_new_process(self._fds)
            # the child watches this duplicate of the data pipe's write end to learn of this process's death
            _parent_w = os.dup(w)
            self.finalizer = util.Finalize(self, util.close_fds, (_parent_w, self.sentinel))
            with open(w, "wb", closefd=True) as f:
                f.write(buf.getbuffer())
            self.pid = multiprocessing.forkserver.read_signed(self.sentinel)

    class _WorkerProcess(multiprocessing.context.ForkServerProcess):
        """A process started by `_WorkerPopen`."""

        @staticmethod
        def _Popen(process_obj: Any) -> _WorkerPopen:
            return _WorkerPopen(process_obj)

    class _WorkerContext(multiprocessing.context.ForkServerContext):
        """The forkserver context, starting `_WorkerProcess`es."""

        Process = _WorkerProcess


def start_worker_server() -> None:
    """Boot the forkserver in the background now, so the first decoder worker starts in milliseconds later.

    On Linux it boots at the workers' low priority (niceness is per thread there and inherited by children, so a
    short-lived thread lowers its own and launches it): when the run turns out to have nothing to decode, its
    start-up does not slow this process down on a busy machine.
    """
    if worker_context().get_start_method() != "forkserver":
        return
    if sys.platform != "linux":
        multiprocessing.forkserver.ensure_running()
        return

    def launch() -> None:
        lower_priority()  # to the workers' niceness, not 10 more: a run started with `nice -n 10` stays at 10
        multiprocessing.forkserver.ensure_running()

    thread = threading.Thread(target=launch, name="clipsearch-forkserver-launch")
    thread.start()
    thread.join()


def exit_with_parent() -> None:
    """End this worker as soon as the process that started it is gone, however it ended (even by SIGKILL).

    A worker left behind would otherwise wait at the pool's gate forever, and with it the forkserver and
    multiprocessing's resource tracker, which live as long as any worker does; all of them hold the dead
    indexer's stdout and stderr open, so whoever reads its output would wait forever too.
    """
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()  # returns when the parent's end of a pipe to this process closes, i.e. at its exit
        os._exit(1)

    threading.Thread(target=watch, name="clipsearch-parent-watch", daemon=True).start()


def lower_priority() -> None:
    """Bring this process to the workers' niceness (no further if it is there already)."""
    os.nice(max(0, WORKER_NICENESS - os.nice(0)))
