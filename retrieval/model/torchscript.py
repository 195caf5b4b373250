"""The tensors of a TorchScript archive (OpenAI's released checkpoints), read as data: none of its code runs.

`torch.jit.load` compiles the archive's `code/` and runs every scripted `__setstate__` it finds, so a crafted
`.pt` does whatever its author wrote (TorchScript can create and overwrite files). This module reads the same
weights `torch.jit.load(path).state_dict()` would give without any of that. An archive is a zip:

    <name>/data.pkl      the module tree: `__torch__.*` objects whose state dicts hold submodules and tensors
    <name>/data/<key>    the raw bytes of each tensor storage, named by a persistent id in data.pkl
    <name>/code/, constants.pkl, ...   TorchScript code and traced constants: never read here

data.pkl goes through `_Unpickler`, whose `find_class` answers only four kinds of names, each with something
of ours that runs no foreign code: `__torch__.*` -> `_ScriptObject` (records its state, nothing else);
`torch._utils._rebuild_tensor_v2` -> `_TensorRef` (a tuple describing a view); `collections.OrderedDict`
(the empty hooks dict each tensor carries); `torch.<Type>Storage` -> its dtype. Anything else (`os.system`,
`builtins.exec`, any other torch function) stops the read. Since these are the only callables that can reach
the unpickler's stack, and none calls anything it is given, unpickling cannot run code. Storage bytes are read
afterwards, only from `<name>/data/<key>` entries listed in the zip, with every view checked against its
storage's size.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import IO, Any, NamedTuple

import torch

from retrieval.errors import CheckpointError

# The storage classes TorchScript's pickler names, and the dtype of each.
_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
# Storage keys torch writes ("0", "1", ...); no separators, so a key can only name an entry of the data folder.
_STORAGE_KEY = re.compile(r"[A-Za-z0-9_]+")


def is_torchscript_archive(names: list[str]) -> bool:
    """Whether a zip's entry names are a TorchScript archive's (torch.save's zips have no constants.pkl or code/)."""
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def read_torchscript_state_dict(archive: zipfile.ZipFile, path: Path) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a TorchScript archive, named as `torch.jit.load(path).state_dict()` names them.

    Args:
        archive: the open archive.
        path: its path, for error messages.

    Raises:
        CheckpointError: data.pkl names anything but modules and tensors (the name is in the message), a module
            keeps custom state that only its own code could read, or a storage is missing, short or corrupt.
    """
    root = _archive_root(archive, path)
    keys = {
        name.removeprefix(f"{root}data/")
        for name in archive.namelist()
        if name.startswith(f"{root}data/") and _STORAGE_KEY.fullmatch(name.removeprefix(f"{root}data/"))
    }
    byteorder = f"{root}byteorder"
    if byteorder in archive.namelist() and archive.read(byteorder).strip() != b"little":
        raise CheckpointError(
            f"{path}: a big-endian TorchScript archive is not supported; save it on a little-endian machine"
        )
    try:
        with archive.open(f"{root}data.pkl") as data:
            module = _Unpickler(data, keys).load()
    except _Refused as e:
        raise CheckpointError(f"{path}: refusing {root}data.pkl: {e}; a checkpoint's code is never run") from e
    except Exception as e:  # UnpicklingError, EOFError, TypeError, BadZipFile, ... for a broken file
        raise CheckpointError(
            f"{path}: cannot read {root}data.pkl ({_first_line(e)}); the file is damaged: download or copy it again"
        ) from e
    if not isinstance(module, _ScriptObject):
        raise CheckpointError(f"{path}: {root}data.pkl holds a {type(module).__name__}, not a TorchScript module")
    storages: dict[str, torch.Tensor] = {}
    return {name: _materialize(ref, archive, root, storages, path) for name, ref in _tensor_refs(module, path).items()}


class _StorageRef(NamedTuple):
    """A storage named in data.pkl, not yet read."""

    key: str  # the entry <root>data/<key>
    dtype: torch.dtype
    numel: int


class _TensorRef(NamedTuple):
    """A view of a storage, as `torch._utils._rebuild_tensor_v2` would make it."""

    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _tensor_ref(
    storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False, hooks: Any = None, meta: Any = None
) -> _TensorRef:
    """Stands in for `_rebuild_tensor_v2`; the arguments are checked when the tensor is read."""
    return _TensorRef(storage, offset, size, stride)


class _ScriptObject:
    """Stands in for every `__torch__.*` class: keeps the state it is given and runs nothing."""

    __slots__ = ("state",)

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _Refused(pickle.UnpicklingError):
    """data.pkl asks for something a checkpoint of tensors never needs."""


class _Unpickler(pickle.Unpickler):
    """data.pkl's unpickler: only modules, tensors and plain containers (see the module docstring)."""

    def __init__(self, file: IO[bytes], storage_keys: set[str]) -> None:
        super().__init__(file)
        self._storage_keys = storage_keys

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptObject
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _tensor_ref
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise _Refused(f"it refers to {module}.{name}, which a checkpoint of tensors never needs")

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], torch.dtype)
            and isinstance(pid[2], str)
            and type(pid[4]) is int
            and pid[4] >= 0
        ):
            raise _Refused(f"persistent id {pid!r} is not a tensor storage")
        _, dtype, key, _, numel = pid
        if key not in self._storage_keys:
            raise _Refused(f"storage {key!r} is not an entry of the archive's data folder")
        return _StorageRef(key, dtype, numel)


def _archive_root(archive: zipfile.ZipFile, path: Path) -> str:
    """The archive's top folder ("ViT-B-32/"), the one holding data.pkl."""
    roots = [n.removesuffix("data.pkl") for n in archive.namelist() if re.fullmatch(r"[^/]+/data\.pkl", n)]
    if len(roots) != 1:
        raise CheckpointError(
            f"{path}: a TorchScript archive has one <name>/data.pkl, this zip has {len(roots)}; "
            "it is damaged or not a model: download or copy it again"
        )
    return roots[0]


def _tensor_refs(root: _ScriptObject, path: Path) -> dict[str, _TensorRef]:
    """Every tensor attribute of the module tree, by dotted name; each module is visited once (no cycles)."""
    found: dict[str, _TensorRef] = {}
    pending: list[tuple[str, _ScriptObject]] = [("", root)]
    seen: set[int] = set()
    while pending:
        prefix, module = pending.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        state = getattr(module, "state", None)
        if not isinstance(state, dict):
            where = prefix.removesuffix(".") or "the top module"
            raise CheckpointError(
                f"{path}: {where} keeps custom state that only its own TorchScript code could read, and a "
                "checkpoint's code is never run; save the weights as a state dict (torch.save(model.state_dict(), "
                "path)) or as safetensors instead"
            )
        for name, value in state.items():
            if isinstance(value, _TensorRef):
                found[f"{prefix}{name}"] = value
            elif isinstance(value, _ScriptObject):
                pending.append((f"{prefix}{name}.", value))
    return found


def _materialize(
    ref: _TensorRef, archive: zipfile.ZipFile, root: str, storages: dict[str, torch.Tensor], path: Path
) -> torch.Tensor:
    """The tensor a `_TensorRef` describes, its storage read once from the zip and shared by its views."""
    storage = ref.storage
    if not isinstance(storage, _StorageRef) or not _is_view(ref):
        raise CheckpointError(f"{path}: {root}data.pkl describes a malformed tensor {ref!r}")
    if storage.key not in storages:
        storages[storage.key] = _read_storage(archive, f"{root}data/{storage.key}", storage, path)
    flat = storages[storage.key]
    if flat.dtype != storage.dtype:
        raise CheckpointError(f"{path}: storage {storage.key!r} is read as two different dtypes")
    if 0 in ref.size:
        return torch.empty(ref.size, dtype=storage.dtype)
    extent = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride, strict=True)) + 1
    if extent > flat.numel():
        raise CheckpointError(
            f"{path}: a tensor of {root}data.pkl reaches element {extent} of storage {storage.key!r}, "
            f"which has {flat.numel()}; the file is damaged: download or copy it again"
        )
    return torch.as_strided(flat, ref.size, ref.stride, ref.offset)


def _is_view(ref: _TensorRef) -> bool:
    """Offset, sizes and strides are non-negative ints, as many strides as sizes."""
    if not (isinstance(ref.size, tuple) and isinstance(ref.stride, tuple) and len(ref.size) == len(ref.stride)):
        return False
    return all(type(n) is int and n >= 0 for n in (ref.offset, *ref.size, *ref.stride))


def _read_storage(archive: zipfile.ZipFile, entry: str, storage: _StorageRef, path: Path) -> torch.Tensor:
    """One storage's bytes as a flat tensor of its dtype (zip reads check the entry's CRC)."""
    expected = storage.numel * storage.dtype.itemsize
    stored = archive.getinfo(entry).file_size
    if stored != expected:
        raise CheckpointError(
            f"{path}: {entry} holds {stored} bytes instead of the {expected} its tensor needs; "
            "the file is damaged: download or copy it again"
        )
    buffer = bytearray(expected)
    try:
        with archive.open(entry) as f:
            view, filled = memoryview(buffer), 0
            while filled < expected and (n := f.readinto(view[filled:])):
                filled += n
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise CheckpointError(
            f"{path}: cannot read {entry} ({e}); the file is damaged: download or copy it again"
        ) from e
    if filled != expected:
        raise CheckpointError(f"{path}: {entry} ends early; the file is damaged: download or copy it again")
    if expected == 0:
        return torch.empty(0, dtype=storage.dtype)
    return torch.frombuffer(buffer, dtype=storage.dtype)


def _first_line(error: BaseException) -> str:
    """The first line of an exception's message."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
