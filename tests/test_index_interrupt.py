"""Interruption: `clipsearch index` killed with SIGKILL at several points, then re-run, must end with exactly
one row per image and the vectors of an uninterrupted run. Ctrl-C and SIGTERM save what was encoded and say so;
no process of a killed run (decoder workers, their forkserver, multiprocessing's resource tracker) outlives it.

The model is a random CLIP a little heavier than `tiny-vit` (about 10 ms per image on one thread), so a run
over 300 images lasts long enough to be killed after its first commit and in the middle of a chunk.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import numpy as np
import pytest
import torch
from test_index_support import vectors_by_path, write_images

from indexer.pipeline import IndexOptions, index_folders
from retrieval.errors import StoreError
from retrieval.model.checkpoint import save_checkpoint
from retrieval.model.clip import CLIP
from retrieval.model.config import CLIPConfig, TextConfig, VisionConfig
from retrieval.model.loading import load_model
from retrieval.store import Store

N_IMAGES = 300
CHUNK = 25
CONFIG = CLIPConfig(
    64, VisionConfig(image_size=64, width=256, layers=4, heads=4, patch_size=8), TextConfig(128, 2, 1, 1)
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("interrupt")
    torch.manual_seed(0)
    checkpoint = save_checkpoint(CLIP(CONFIG), tmp / "model", name="interrupt-test")
    photos = tmp / "photos"
    write_images(photos, N_IMAGES)
    model, preprocess = load_model(checkpoint, towers="image")
    reference = Store.open(tmp / "reference", model.info, create=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocesses; several threads on a busy machine can be far slower
    try:
        index_folders([photos], model, preprocess, reference, IndexOptions(workers=0, progress=False))
    finally:
        torch.set_num_threads(threads)
    return {"tmp": tmp, "checkpoint": checkpoint, "photos": photos, "model": model,
            "reference": vectors_by_path(reference)}  # fmt: skip


PATIENCE = 60.0  # seconds allowed for what takes well under one on an idle machine
INTERRUPTED = "Interrupted: {} images saved; run the same command again to carry on."


def start_index(setup, db: Path, workers: int = 1, stdout: int = subprocess.DEVNULL) -> subprocess.Popen:
    command = [
        sys.executable, "-c", "from clipsearch.cli import main; main()", "index", str(setup["photos"]),
        "--db", str(db), "--model", str(setup["checkpoint"]), "--workers", str(workers), "--batch-size", "5",
        "--commit-every", str(CHUNK), "--quiet",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # steady speed on a shared machine
    return subprocess.Popen(command, env=env, stdout=stdout, stderr=subprocess.PIPE)


def stored_count(db: Path, model) -> int:
    try:
        return Store.open(db, model.info).count()
    except StoreError:  # the table does not exist yet
        return 0


def wait_for_rows(process: subprocess.Popen, db: Path, model, at_least: int) -> int:
    """Wait until the store holds `at_least` rows (or the run ends); returns the rows seen then."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        count = stored_count(db, model)
        if count >= at_least or process.poll() is not None:
            break
        time.sleep(0.01)
    return count


def kill_when(process: subprocess.Popen, db: Path, model, at_least: int, extra_delay: float = 0.0) -> int:
    """SIGKILL the run once the store holds `at_least` rows (plus a delay); returns the rows seen then."""
    count = wait_for_rows(process, db, model, at_least)
    time.sleep(extra_delay)
    assert process.poll() is None, f"the run finished before it could be killed: {process.stderr.read()!r}"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    return count


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def descendants(pid: int) -> dict[int, str]:
    """Every process below `pid`, with its start time (so that a pid taken over later is not mistaken for it)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        fields = _stat(int(entry)) if entry.isdigit() else None
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            fields = _stat(child)
            if fields is not None:
                found[child] = fields[19]
                todo.append(child)
    return found


def still_running(processes: dict[int, str]) -> list[int]:
    """Those of `processes` still running (a zombie, dead but not yet reaped, does not count)."""
    running = []
    for pid, started in processes.items():
        fields = _stat(pid)
        if fields is not None and fields[0] not in "ZX" and fields[19] == started:
            running.append(pid)
    return running


def read_to_end(stream: IO[bytes], seconds: float) -> str | None:
    """Everything written to a pipe, once every process holding it open has closed it; None if that takes longer
    than `seconds`."""
    out: list[bytes] = []
    reader = threading.Thread(target=lambda: out.append(stream.read()), daemon=True)
    reader.start()
    reader.join(seconds)
    return out[0].decode() if out else None


def signal_mid_run(setup, db: Path, signum: int) -> tuple[subprocess.Popen, int, str | None, str | None]:
    """Start a run with two decoder workers, send `signum` once it has committed a chunk, and check that every
    process it started ends and lets go of its stdout and stderr. Returns the process, the rows stored before the
    signal, and its stdout and stderr."""
    process = start_index(setup, db, workers=2, stdout=subprocess.PIPE)
    family: dict[int, str] = {}
    try:
        rows = wait_for_rows(process, db, setup["model"], at_least=CHUNK)
        assert process.poll() is None, f"the run finished before the signal: {process.stderr.read()!r}"
        family = descendants(process.pid)
        # the workers, their forkserver and multiprocessing's resource tracker: what a killed run used to leave
        assert len(family) >= 4, family
        process.send_signal(signum)
        stdout = read_to_end(process.stdout, PATIENCE)
        stderr = read_to_end(process.stderr, PATIENCE)
        process.wait(PATIENCE)
        deadline = time.monotonic() + PATIENCE
        while still_running(family) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert still_running(family) == [], "processes of the run outlived it"
        assert stdout is not None and stderr is not None, "the run's stdout or stderr stayed open after it ended"
        return process, rows, stdout, stderr
    finally:  # a failure must not leave the processes it is about behind
        for pid in still_running(family):
            os.kill(pid, signal.SIGKILL)
        if process.poll() is None:
            process.kill()
            process.wait()


def check_consistent(db: Path, model) -> int:
    """The table opens, and no path or id appears twice."""
    store = Store.open(db, model.info)
    rows = store.rows(store.ids(), columns=["id", "path"])
    assert len({r["path"] for r in rows}) == len(rows) == len({r["id"] for r in rows})
    return len(rows)


def test_killed_runs_resume_to_the_uninterrupted_result(setup):
    db, model = setup["tmp"] / "db", setup["model"]

    # 1. killed right after its first chunk is committed
    first = kill_when(start_index(setup, db), db, model, at_least=CHUNK)
    assert CHUNK <= first < N_IMAGES
    after_first = check_consistent(db, model)
    assert CHUNK <= after_first < N_IMAGES

    # 2. the re-run resumes (nothing committed is redone) and is killed in the middle of a chunk
    second = start_index(setup, db)
    kill_when(second, db, model, at_least=after_first + 1, extra_delay=0.15)
    after_second = check_consistent(db, model)
    assert after_first < after_second < N_IMAGES

    # 3. Ctrl-C (SIGINT) mid-run: the rows already encoded are committed, the run is recorded as interrupted
    third = start_index(setup, db)
    deadline = time.monotonic() + 120
    while stored_count(db, model) <= after_second and third.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert third.poll() is None, "the run finished before it could be interrupted"
    third.send_signal(signal.SIGINT)
    _, stderr = third.communicate(timeout=60)
    assert third.returncode == 128 + signal.SIGINT
    after_third = check_consistent(db, model)
    assert after_second < after_third < N_IMAGES
    assert stderr.decode().splitlines() == [INTERRUPTED.format(after_third - after_second)]  # not "Aborted!"
    assert Store.open(db, model.info).state.runs()[-1]["state"] == "interrupted"

    # 4. a run to the end
    final = start_index(setup, db)
    assert final.wait(timeout=300) == 0, final.stderr.read()
    assert check_consistent(db, model) == N_IMAGES
    store = Store.open(db, model.info)
    vectors = vectors_by_path(store)
    reference = setup["reference"]
    assert sorted(vectors) == sorted(reference)
    for path, vector in vectors.items():
        np.testing.assert_allclose(vector, reference[path], atol=1e-6, rtol=0)
    runs = store.state.runs()
    assert [r["state"] for r in runs] == ["running", "running", "interrupted", "complete"]
    assert runs[-1]["unchanged"] == after_third and runs[-1]["indexed"] == N_IMAGES - after_third


def test_a_killed_run_leaves_no_process_behind(setup):
    signal_mid_run(setup, setup["tmp"] / "db-sigkill", signal.SIGKILL)


def test_sigterm_saves_the_work_done_like_ctrl_c(setup):
    db, model = setup["tmp"] / "db-sigterm", setup["model"]
    process, rows_before, _, stderr = signal_mid_run(setup, db, signal.SIGTERM)
    assert process.returncode == 128 + signal.SIGTERM
    saved = check_consistent(db, model)
    assert rows_before <= saved < N_IMAGES  # committed rows kept, and what was encoded since
    assert stderr.splitlines() == [INTERRUPTED.format(saved)]
    assert Store.open(db, model.info).state.runs()[-1]["state"] == "interrupted"
