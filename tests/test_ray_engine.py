"""The Ray engine (`index --engine ray`) against the local engine, on a local Ray cluster started once per session.

Real parts: a tiny random CLIP, real JPEG files, real LanceDB stores in tmp_path, Ray tasks and actors in their own
processes, killed for real (a decode task's worker and an encoder actor exit mid-run; a driver gets SIGKILL).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from test_index_support import pattern, tiny_model, vectors_by_path, write_images

from indexer.decode import Decoder, DecodeTask
from indexer.pipeline import IndexOptions, index_folders
from retrieval.model.clip import CLIP
from retrieval.store import Store
from retrieval.views import ViewStore

N_IMAGES = 200
KILLED_RUN_IMAGES = 120  # with `SlowDecoder`, a run of several seconds at least: time to kill it after a commit
OPTIONS = IndexOptions(workers=0, batch_size=16, commit_every=48, progress=False)
COUNTS = ("found", "indexed", "new", "changed", "unchanged", "moved", "removed", "failed", "duplicates")
HERE = Path(__file__).parent


@pytest.fixture(scope="session")
def cluster():
    """A 2-CPU Ray cluster for the whole session, its files in a temp dir of its own; yields its address."""
    from ray import cloudpickle

    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the fault injectors below, in Ray's workers
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, logging_level="ERROR", log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def run_ray(model, store, *sources, decoder=None, **changes):
    from indexer.ray_engine import index_with_ray

    options = IndexOptions(**{**OPTIONS.__dict__, **changes})
    return index_with_ray([str(s) for s in sources], model[0], model[1], store, options, decoder=decoder)


def run_local(model, store, *roots, **changes):
    return index_folders(roots, model[0], model[1], store, IndexOptions(**{**OPTIONS.__dict__, **changes}))


def counts(summary) -> dict[str, int]:
    return {k: getattr(summary, k) for k in COUNTS}


def rows_by_path(store) -> dict[str, dict]:
    """Every row's metadata keyed by path, without what differs between runs (id, indexing time)."""
    rows = store.rows(store.ids())
    return {r["path"]: {k: v for k, v in r.items() if k not in ("id", "indexed_at")} for r in rows}


def assert_same_store(ours, reference):
    """Same paths and metadata, vectors with cosine >= 0.9999, one row per path and unique ids."""
    assert rows_by_path(ours) == rows_by_path(reference)
    a, b = vectors_by_path(ours), vectors_by_path(reference)
    assert min(float(a[p] @ b[p]) for p in b) >= 0.9999
    ids = ours.ids().tolist()
    assert len(ids) == len(set(ids)) == ours.count() == reference.count()


def test_same_rows_and_sync_as_the_local_engine(tmp_path, cluster, model):
    photos = tmp_path / "photos"
    paths = write_images(photos, N_IMAGES)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    local = Store.open(tmp_path / "local", model[0].info, create=True)
    distributed = Store.open(tmp_path / "ray", model[0].info, create=True)
    first = run_local(model, local, photos), run_ray(model, distributed, photos)
    assert counts(first[1]) == counts(first[0])
    assert (first[1].indexed, first[1].failed) == (N_IMAGES, 1)
    assert_same_store(distributed, local)
    assert distributed.state.failures() == local.state.failures()
    assert [f.stage for f in distributed.state.failures()] == ["decode"]

    # added, changed, renamed, moved into a sub-folder, deleted, a copy of stored content; the broken file fixed
    write_images(photos, 3, start=1000)
    pattern(5000).save(paths[0])
    os.utime(paths[0], ns=(1, 1_000_000_000))
    os.rename(paths[1], photos / "renamed.jpg")
    (photos / "2024").mkdir()
    os.rename(paths[2], photos / "2024" / "moved.jpg")
    paths[3].unlink()
    shutil.copy(paths[4], photos / "copy.jpg")
    pattern(6000).save(photos / "broken.jpg")
    second = run_local(model, local, photos), run_ray(model, distributed, photos)
    assert counts(second[1]) == counts(second[0])
    assert (second[1].new, second[1].changed, second[1].moved, second[1].removed) == (5, 1, 2, 1)
    assert_same_store(distributed, local)
    assert distributed.state.failures() == local.state.failures() == []
    assert counts(run_ray(model, distributed, photos))["unchanged"] == N_IMAGES + 3 + 1


def views_by_path(store) -> dict[str, np.ndarray]:
    """Each image's sub-view vectors [V, D] keyed by its path."""
    paths = {r["id"]: r["path"] for r in store.rows(store.ids(), columns=["id", "path"])}
    stored = ViewStore.open(store).for_images(sorted(paths))
    return {paths[i]: vectors for i, (_, vectors) in stored.items()}


def assert_same_views(ours, reference):
    """Every image has its views, as the reference's to cosine >= 0.9999, and no view outlives its image."""
    a, b = views_by_path(ours), views_by_path(reference)
    assert sorted(a) == sorted(b) == sorted(r["path"] for r in ours.rows(ours.ids(), columns=["path"]))
    assert min(float(np.min(np.sum(a[p] * b[p], axis=1))) for p in b) >= 0.9999
    assert ViewStore.open(ours).count() == 5 * ours.count()


def test_sub_views_are_stored_as_the_local_engine_stores_them(tmp_path, cluster, model):
    photos = tmp_path / "photos"
    paths = write_images(photos, 40)
    local = Store.open(tmp_path / "local", model[0].info, create=True)
    distributed = Store.open(tmp_path / "ray", model[0].info, create=True)
    run_local(model, local, photos, views=5)
    assert run_ray(model, distributed, photos, views=5, commit_every=16).commits >= 2  # views written per chunk
    assert_same_store(distributed, local)
    assert_same_views(distributed, local)

    # without --views, the store's setting: new and changed files get views, a copy its source's, a moved file keeps
    # its own, a deleted file's go with it
    write_images(photos, 3, start=1000)
    pattern(5000).save(paths[0])
    os.utime(paths[0], ns=(1, 1_000_000_000))
    os.rename(paths[1], photos / "renamed.jpg")
    paths[2].unlink()
    shutil.copy(paths[3], photos / "copy.jpg")
    second = run_local(model, local, photos), run_ray(model, distributed, photos)
    assert counts(second[1]) == counts(second[0])
    assert_same_store(distributed, local)
    assert_same_views(distributed, local)


def test_a_fragment_committed_twice_is_stored_once_with_its_deletions(tmp_path, model):
    """What a retried batch or a retried commit does: the same ids come in again and replace their rows."""
    from lance_ray.fragment import write_fragment

    from retrieval.store import ImageRow, WrittenFragment, rows_to_arrow, utc_now
    from retrieval.types import ImageMetadata

    store = Store.open(tmp_path / "db", model[0].info, create=True)
    rng = np.random.default_rng(0)

    def rows(ids):
        vectors = rng.normal(size=(len(ids), store.embed_dim)).astype(np.float32)
        meta = [ImageMetadata(f"hash{i}", 4, 3, "PNG", None, None, None) for i in ids]
        return [ImageRow(i, f"/p/{i}.png", 10, 5, m, utc_now(), v) for i, m, v in zip(ids, meta, vectors, strict=True)]

    store.apply(rows([1, 2, 3]))
    target = store.fragment_target()
    new = rows([4, 5])
    [(metadata, _)] = write_fragment(iter([rows_to_arrow(new, target.schema, store.embed_dim)]), target.uri,
                                     schema=target.schema, data_storage_version=target.storage_version)  # fmt: skip
    fragment = WrittenFragment(metadata, [4, 5])
    store.apply_fragments([fragment], rows([6]), delete_ids=[2])
    store.apply_fragments([fragment], delete_ids=[2])
    assert store.ids().tolist() == [1, 3, 4, 5, 6]
    np.testing.assert_array_equal(store.vectors_for([4, 5]), np.stack([r.vector for r in new]))
    assert [r["path"] for r in store.rows([4, 5, 6])] == ["/p/4.png", "/p/5.png", "/p/6.png"]


@dataclass(frozen=True)
class CrashingDecoder(Decoder):
    """Ends its worker process (as a codec crash would) at the first `poison` file, once: `marker` records it."""

    marker: str = ""

    def __call__(self, task: DecodeTask):
        if "poison" in os.path.basename(task.path) and not os.path.exists(self.marker):
            Path(self.marker).touch()
            os._exit(1)
        return super().__call__(task)


class ActorKillingCLIP(CLIP):
    """A CLIP whose third batch ends the process encoding it (an encoder actor), once: `marker` records it."""

    marker: str = ""
    calls = 0

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 3 and not os.path.exists(self.marker):
            Path(self.marker).touch()
            os._exit(1)
        return super().encode_image(pixels)


def test_a_killed_decode_worker_and_a_killed_encoder_actor_lose_and_repeat_nothing(tmp_path, cluster, model):
    photos = tmp_path / "photos"
    write_images(photos, 64)
    shutil.copy(photos / "img0050.jpg", photos / "poison.jpg")
    reference = Store.open(tmp_path / "local", model[0].info, create=True)
    run_local(model, reference, photos)

    torch.manual_seed(0)
    killing = ActorKillingCLIP(model[0].config).eval()
    killing.load_state_dict(model[0].state_dict())
    killing.info = model[0].info
    killing.marker = str(tmp_path / "actor-killed")
    decoder = CrashingDecoder(model[1], marker=str(tmp_path / "decoder-killed"))
    store = Store.open(tmp_path / "ray", model[0].info, create=True)
    summary = run_ray((killing, model[1]), store, photos, decoder=decoder)
    assert (tmp_path / "actor-killed").exists() and (tmp_path / "decoder-killed").exists()  # both processes died
    assert (summary.indexed, summary.failed) == (65, 0)
    assert_same_store(store, reference)


def test_a_driver_killed_mid_run_then_rerun(tmp_path, cluster, model):
    photos = tmp_path / "photos"
    write_images(photos, KILLED_RUN_IMAGES)
    reference = Store.open(tmp_path / "local", model[0].info, create=True)
    run_local(model, reference, photos)
    db = tmp_path / "ray"
    Store.open(db, model[0].info, create=True)
    script = f"""
import sys
sys.path[:0] = [{str(HERE)!r}]
from ray import cloudpickle
import test_ray_engine as t
cloudpickle.register_pickle_by_value(t)
from indexer.ray_engine import RayOptions, index_with_ray
from retrieval.store import Store
from retrieval.views import ViewStore
model, preprocess = t.tiny_model()
store = Store.open({str(db)!r}, model.info)
options = t.IndexOptions(workers=0, batch_size=8, commit_every=16, progress=False)
index_with_ray([{str(photos)!r}], model, preprocess, store, options, RayOptions(address={cluster!r}),
               decoder=t.SlowDecoder(preprocess))
"""
    process = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None and Store.open(db, model[0].info).count() < 16:
        time.sleep(0.05)
    assert process.poll() is None, f"the run ended before it could be killed: {process.stderr.read()!r}"
    process.send_signal(signal.SIGKILL)
    process.wait()
    store = Store.open(db, model[0].info)
    saved = store.count()
    assert 16 <= saved < KILLED_RUN_IMAGES

    summary = run_ray(model, store, photos)
    rest = KILLED_RUN_IMAGES - saved
    assert (summary.unchanged, summary.new, summary.indexed) == (saved, rest, rest)
    assert_same_store(store, reference)


@dataclass(frozen=True)
class SlowDecoder(Decoder):
    """Takes a while per file, so that a run is still going when the test kills it."""

    def __call__(self, task: DecodeTask):
        time.sleep(0.05)
        return super().__call__(task)


def test_manifest_and_file_uri_sources(tmp_path, cluster, model):
    photos = tmp_path / "photos"
    paths = write_images(photos, 12)
    reference = Store.open(tmp_path / "local", model[0].info, create=True)
    run_local(model, reference, *paths[:6])
    manifest = photos / "list.csv"
    entries = [str(paths[0]), paths[1].name, paths[2].as_uri(), str(paths[3]), str(paths[4]), str(paths[5])]
    manifest.write_text("path\n" + "\n".join([*entries, str(photos / "missing.jpg")]) + "\n")
    store = Store.open(tmp_path / "manifest", model[0].info, create=True)
    summary = run_ray(model, store, manifest)
    assert (summary.found, summary.indexed) == (7, 6)
    assert [(f.path, f.stage) for f in summary.failures] == [(str(photos / "missing.jpg"), "walk")]
    assert_same_store(store, reference)

    jsonl = tmp_path / "list.jsonl"
    jsonl.write_text("".join(json.dumps({"uri": p.as_uri()}) + "\n" for p in paths[:6]))
    assert counts(run_ray(model, store, jsonl))["unchanged"] == 6

    folder = Store.open(tmp_path / "folder", model[0].info, create=True)
    run_local(model, folder, photos)
    by_uri = Store.open(tmp_path / "uri", model[0].info, create=True)
    assert run_ray(model, by_uri, photos.as_uri()).indexed == 12
    assert_same_store(by_uri, folder)
    paths[0].unlink()
    assert counts(run_ray(model, by_uri, photos.as_uri()))["removed"] == 1  # sync works on URIs as on folders


def test_the_cli_runs_the_ray_engine_and_names_the_extra_when_ray_is_missing(tmp_path, cluster):
    from test_index_support import tiny_checkpoint

    photos = tmp_path / "photos"
    write_images(photos, 10)
    checkpoint = tiny_checkpoint(tmp_path / "model")
    command = [sys.executable, "-c", "from clipsearch.cli import main; main()", "index", str(photos),
               "--db", str(tmp_path / "db"), "--model", str(checkpoint), "--engine", "ray", "--ray-address", cluster,
               "--json"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["indexed"], summary["total"], summary["failed"]) == (10, 10, 0)
    # nothing on stderr but Ray core's notice (from C++, unavoidable in Ray 2.60) that actor arguments live in the
    # object store, which Ray Data prints for every actor pool
    assert [line for line in done.stderr.splitlines() if "ray-project/ray/issues/53727" not in line] == []

    blocked = ["-c", "import sys; sys.modules['ray'] = None; from clipsearch.cli import main; main()"]
    done = subprocess.run([sys.executable, *blocked, *command[3:]], capture_output=True, text=True, timeout=600)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "Error: --engine ray needs Ray Data and lance-ray (ray is missing): pip install 'clipsearch[distributed]'"
    )

    done = subprocess.run([*command[:4], str(tmp_path / "list.csv")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "does not exist" in done.stderr
    (tmp_path / "list.csv").write_text(f"path\n{photos / 'img0000.jpg'}\n")
    local = [*command[:5], str(tmp_path / "list.csv"), "--db", str(tmp_path / "db"), "--model", str(checkpoint)]
    done = subprocess.run(local, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and "is a URI or a manifest: index it with --engine ray" in done.stderr


def test_an_object_store_db_is_refused_with_what_to_do(tmp_path):
    """`--db s3://...` (or $CLIPSEARCH_HOME) is not a store yet: one line saying what is supported, no local
    directory named `s3:` made on the way, whatever the engine or command."""
    from test_index_support import tiny_checkpoint

    photos = tmp_path / "photos"
    write_images(photos, 2)
    checkpoint = str(tiny_checkpoint(tmp_path / "model"))
    cli = [sys.executable, "-c", "from clipsearch.cli import main; main()"]
    expected = (
        "the store must be a directory (local, or a network file system every node mounts); object-store URIs are "
        "not supported as --db, since the lock and state files kept beside the table are local files: mount the "
        "bucket (s3fs, gcsfuse, blobfuse) and pass the mount's path"
    )
    for args, env in (
        (["index", str(photos), "--db", "s3://bucket/store", "--model", checkpoint], {}),
        (["index", str(photos), "--db", "gs://bucket/store", "--model", checkpoint, "--engine", "ray"], {}),
        (["index", str(photos), "--model", checkpoint], {"CLIPSEARCH_HOME": "s3://bucket/store"}),
        (["query", "a photo", "--db", "s3://bucket/store"], {}),
    ):
        done = subprocess.run(
            [*cli, *args], capture_output=True, text=True, cwd=tmp_path, env={**os.environ, **env}, timeout=600
        )
        assert done.returncode == 1, (args, done.stderr)
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith(("Error: s3:/", "Error: gs:/")) and last.endswith(expected), (args, last)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(("s3:", "gs:"))] == []
