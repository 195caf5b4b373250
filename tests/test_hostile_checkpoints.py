"""Crafted TorchScript checkpoints run none of their code: `load_model` and `clipsearch index --model` read them
as data in a fresh process, and every file the payloads aim at stays as it was."""

from __future__ import annotations

import functools
import hashlib
import pickle
import subprocess
import sys
import threading
import warnings
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from retrieval.model.checkpoint import read_checkpoint
from tests.test_loading import TOKENS, tiny_model

LOAD = "import sys, clipsearch; clipsearch.load_model(sys.argv[1]); print('loaded')"
LOAD_REGISTERED = (
    "import sys, clipsearch\n"
    "from retrieval.model.registry import ModelSpec, register_model\n"
    "register_model(ModelSpec('ViT-B/32-crafted', 'a crafted release', url=sys.argv[1], sha256=sys.argv[2]))\n"
    "clipsearch.load_model('ViT-B/32-crafted')\n"
)
QUERY = "from clipsearch.cli import main; main()"
VICTIM_TEXT = b"precious bytes that must stay"


class PayloadLayerNorm(nn.Module):
    """A LayerNorm whose scripted `__setstate__`, which `torch.jit.load` runs, creates one file and overwrites
    another (through `torch.from_file(shared=True)`, one of the TorchScript ops that write files)."""

    def __init__(self, width: int, created: str, overwritten: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width))
        self.created = created
        self.overwritten = overwritten
        self.canary = torch.zeros(0, dtype=torch.uint8)

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, torch.Tensor, str, str, bool]:
        return (self.weight, self.bias, self.created, self.overwritten, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, torch.Tensor, str, str, bool]) -> None:
        self.weight, self.bias, self.created, self.overwritten, self.training = state
        created = torch.from_file(self.created, shared=True, size=8, dtype=torch.uint8).fill_(65)
        overwritten = torch.from_file(self.overwritten, shared=True, size=8, dtype=torch.uint8).fill_(65)
        # kept in an attribute: TorchScript drops computations whose results go unused
        self.canary = torch.cat([created, overwritten])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), (x.shape[-1],), self.weight.float(), self.bias.float(), 1e-5).to(x.dtype)


class ExecPayload:
    """Pickles as a call to `exec` that writes `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def payload_model(created: Path, overwritten: Path) -> nn.Module:
    """A tiny CLIP whose ln_final is a `PayloadLayerNorm` aimed at the two paths."""
    model = tiny_model("tiny-vit", fp16_exact=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated; attackers do not care
        model.ln_final = torch.jit.script(PayloadLayerNorm(model.config.text.width, str(created), str(overwritten)))
    return model


def openai_archive(path: Path, model: nn.Module) -> Path:
    """A TorchScript archive laid out like OpenAI's releases: a traced model with fp16 weights."""
    size = model.config.vision.image_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer warns about data-dependent lengths, TorchScript is deprecated
        traced = torch.jit.trace(model, (torch.zeros(1, 3, size, size), TOKENS[:1]), check_trace=False)
        torch.jit.save(traced.half(), str(path))
    return path


def rewrite_archive(source: Path, target: Path, replace: dict[str, bytes], add: dict[str, bytes] | None = None) -> None:
    """Copy a zip, replacing the entries named in `replace` (and dropping those mapped to b"") and adding `add`."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            data = replace.get(info.filename, old.read(info.filename))
            if data:
                new.writestr(info, data)
        for name, data in (add or {}).items():
            new.writestr(zipfile.ZipInfo(name), data)


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root with the SHA-256 of its bytes, except the cache and data dirs a load may write."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).parts[0] not in ("cache", "home")
    }


class QuietHandler(SimpleHTTPRequestHandler):
    """Serves a folder without logging each request to stderr."""

    def log_message(self, *args) -> None:
        pass


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """A fresh Python process; the environment (data and cache dirs in tmp_path) is inherited."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def load_in_subprocess(path: Path, cwd: Path) -> subprocess.CompletedProcess:
    return run("-c", LOAD, str(path), cwd=cwd)


def query_in_subprocess(path: Path, cwd: Path) -> subprocess.CompletedProcess:
    """`clipsearch index --model PATH`: the command that loads a model before it opens (or needs) a store."""
    return run("-c", QUERY, "index", str(cwd), "--model", str(path), "--db", str(cwd / "db"), "--workers", "0", cwd=cwd)


def assert_refused(done: subprocess.CompletedProcess, *fragments: str) -> None:
    """Refused with a CheckpointError (the API) or one `Error:` line (the CLI) containing every fragment."""
    assert done.returncode == 1, done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(("retrieval.errors.CheckpointError: ", "Error: ")), done.stderr
    for fragment in fragments:
        assert fragment in last, last


def test_a_scripted_setstate_in_the_checkpoint_never_runs(tmp_path):
    created, victim = tmp_path / "created", tmp_path / "victim"
    path = openai_archive(tmp_path / "ViT-B-32.pt", payload_model(created, victim))
    victim.write_bytes(VICTIM_TEXT)
    # The payload is live: torch.jit.load runs it.
    done = run("-c", "import sys, torch; torch.jit.load(sys.argv[1])", str(path), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert created.read_bytes() == b"A" * 8 and victim.read_bytes() == b"A" * 8 + VICTIM_TEXT[8:]
    created.unlink()
    victim.write_bytes(VICTIM_TEXT)
    before = snapshot(tmp_path)

    loaded = load_in_subprocess(path, tmp_path)
    queried = query_in_subprocess(path, tmp_path)

    assert not created.exists()
    assert victim.read_bytes() == VICTIM_TEXT
    assert snapshot(tmp_path) == before
    for done in (loaded, queried):
        assert_refused(done, str(path), "ln_final", "custom state")
    assert queried.stderr.count("\n") == 1  # one line, no traceback


def test_a_registry_release_with_a_scripted_setstate_runs_nothing(tmp_path):
    created, victim = tmp_path / "created", tmp_path / "victim"
    served = tmp_path / "served"
    served.mkdir()
    path = openai_archive(served / "ViT-B-32.pt", payload_model(created, victim))
    victim.write_bytes(VICTIM_TEXT)
    before = snapshot(tmp_path)
    handler = functools.partial(QuietHandler, directory=str(served))
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as httpd:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{httpd.server_address[1]}/ViT-B-32.pt"
        sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        try:
            done = run("-c", LOAD_REGISTERED, url, sha256, cwd=tmp_path)
        finally:
            httpd.shutdown()

    assert not created.exists()
    assert victim.read_bytes() == VICTIM_TEXT
    assert snapshot(tmp_path) == before
    assert_refused(done, "ViT-B-32.pt", "ln_final", "custom state")


def test_reduce_payloads_in_every_pickle_of_the_archive_never_run(tmp_path):
    trusted = openai_archive(tmp_path / "trusted.pt", tiny_model("tiny-vit", fp16_exact=True))
    with zipfile.ZipFile(trusted) as archive:
        pickles = [n for n in archive.namelist() if n.endswith(("pkl", "debug_pkl"))]
    assert {"trusted/data.pkl", "trusted/constants.pkl"} <= set(pickles) and len(pickles) > 10
    markers = {name: tmp_path / f"ran-{i}" for i, name in enumerate(pickles)}
    poisoned = {name: pickle.dumps(ExecPayload(marker), protocol=2) for name, marker in markers.items()}
    everything, all_but_data = tmp_path / "everything.pt", tmp_path / "all-but-data.pt"
    rewrite_archive(trusted, everything, poisoned)
    rewrite_archive(trusted, all_but_data, {k: v for k, v in poisoned.items() if k != "trusted/data.pkl"})
    before = snapshot(tmp_path)

    for done in (load_in_subprocess(everything, tmp_path), query_in_subprocess(everything, tmp_path)):
        assert not [m for m in markers.values() if m.exists()]
        assert snapshot(tmp_path) == before
        assert_refused(done, str(everything), "exec, which a checkpoint of tensors never needs")
    # data.pkl alone describes the weights: with it intact the other pickles are never even read.
    done = load_in_subprocess(all_but_data, tmp_path)
    assert not [m for m in markers.values() if m.exists()]
    assert snapshot(tmp_path) == before
    assert done.returncode == 0 and done.stdout == "loaded\n", done.stderr
    expected = read_checkpoint(trusted).state_dict
    got = read_checkpoint(all_but_data).state_dict
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


def test_storage_names_that_leave_the_archive_data_folder_are_refused(tmp_path):
    trusted = openai_archive(tmp_path / "trusted.pt", tiny_model("tiny-vit", fp16_exact=True))
    with zipfile.ZipFile(trusted) as archive:
        data_pkl = archive.read("trusted/data.pkl")
        last = max(int(n.rsplit("/", 1)[1]) for n in archive.namelist() if n.startswith("trusted/data/"))
        storage = archive.read(f"trusted/data/{last}")
    # The last storage's persistent id ('storage', torch.HalfStorage, key, 'cpu', numel) now names "../../escaped"
    # (its key is a number no module attribute shares, so only the storage is renamed).
    escape = "../../escaped"
    key, new_key = str(last).encode(), escape.encode()
    old_string = b"X" + len(key).to_bytes(4, "little") + key
    assert data_pkl.count(old_string) == 1
    patched = data_pkl.replace(old_string, b"X" + len(new_key).to_bytes(4, "little") + new_key)
    path = tmp_path / "a" / "b" / "traversal.pt"
    path.parent.mkdir(parents=True)
    rewrite_archive(
        trusted,
        path,
        {"trusted/data.pkl": patched, f"trusted/data/{last}": b""},
        add={
            f"trusted/data/{escape}": storage,  # what a loader that joins names would read
            "../../outside": b"written outside the archive",
            str(tmp_path / "absolute"): b"written at an absolute path",
        },
    )
    before = snapshot(tmp_path)

    for done in (load_in_subprocess(path, path.parent), query_in_subprocess(path, path.parent)):
        assert snapshot(tmp_path) == before
        assert_refused(done, str(path), repr(escape))
    assert not (tmp_path / "outside").exists() and not (tmp_path / "absolute").exists()
    assert not any(p.name in ("escaped", "outside") for p in tmp_path.rglob("*"))
