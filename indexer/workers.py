"""Where decoder worker processes come from, kept free of heavy imports so a caller can start it first.

Workers fork from a forkserver: a clean process that has imported the decoding code (torch, Pillow) once, with
none of this process's torch or LanceDB threads. Booting it costs an interpreter start plus `import torch`
(~1.5 s on a 2-core machine), so the CLI starts it before loading the model and the two overlap.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
import sys
import threading

# Workers yield the CPU to the main process: the file a worker is still finishing when a CPU batch starts (the
# pool pauses them for the encoder, `DecoderPool.paused`), and decoding beside a GPU encoder, must not hold up
# the threads that encode, feed the GPU or collect results; a decoder competing with the encoder's threads at
# equal priority stalls all of them at each synchronisation point.
WORKER_NICENESS = 10


def worker_context() -> multiprocessing.context.BaseContext:
    """The forkserver context (preloading the decoder) where available, else spawn."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    # "__main__" too: otherwise every worker re-imports the main script (and whatever it imports) itself
    ctx.set_forkserver_preload(["__main__", "indexer.decode"])
    return ctx


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
        os.nice(WORKER_NICENESS)
        multiprocessing.forkserver.ensure_running()

    thread = threading.Thread(target=launch, name="clipsearch-forkserver-launch")
    thread.start()
    thread.join()


def lower_priority() -> None:
    """Bring this process to the workers' niceness (no further if it is there already)."""
    os.nice(max(0, WORKER_NICENESS - os.nice(0)))
