"""Reading CLIP checkpoints of every common format into our model, and writing our own format.

Formats read (`read_checkpoint`):
- OpenAI's TorchScript archives (what the registry downloads): their tensors only, never their code (`torchscript`);
- plain state dicts (.pt/.pth/.bin) and open_clip checkpoints (a dict with a `state_dict` key, possibly
  with DataParallel's `module.` prefixes), read with `torch.load(weights_only=True)`;
- .safetensors files with OpenAI key names;
- Hugging Face `CLIPModel` folders (config.json + weights), converted by `convert_hf`;
- open_clip's MobileCLIP2 checkpoints, whose train-time branches `convert_mobileclip` fuses;
- our own folders: config.json {"format": "clipsearch-checkpoint", ...} + model.safetensors.

Everything comes out as an OpenAI-layout float32 state dict plus its `CLIPConfig`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from retrieval.errors import CheckpointError
from retrieval.model.clip import CLIP, Towers
from retrieval.model.config import CLIPConfig
from retrieval.model.family import EmbeddingModel, build_towers
from retrieval.model.files import CONFIG_FILE, FORMAT, FORMAT_VERSION, TOKENIZER_CONFIG_FILE, WEIGHTS_FILE
from retrieval.model.open_clip_files import OpenClipHints, find_open_clip_config, find_open_clip_weights, read_hints
from retrieval.model.torchscript import is_torchscript_archive, read_torchscript_state_dict

logger = logging.getLogger(__name__)

ACCEPTED_FORMATS = (
    "OpenAI TorchScript .pt, state-dict .pt/.pth/.bin, .safetensors, open_clip checkpoints (CLIP, SigLIP, "
    "MobileCLIP2), Hugging Face CLIPModel and SiglipModel folders, clipsearch checkpoint folders"
)
# Scalars OpenAI's TorchScript archives keep next to the weights; the config carries them instead.
_TORCHSCRIPT_ONLY_KEYS = ("input_resolution", "context_length", "vocab_size")
_SHOWN_KEYS = 5
_MAX_SAFETENSORS_HEADER = 100_000_000  # the safetensors library refuses longer headers


class Checkpoint(NamedTuple):
    """A checkpoint read into OpenAI's layout."""

    state_dict: dict[str, torch.Tensor]  # OpenAI key names, float32, only the towers asked for
    config: CLIPConfig  # the architecture (read from the checkpoint or inferred from tensor shapes)
    format: str  # "clipsearch", "huggingface", "torchscript", "state_dict", "open_clip" or "safetensors"
    name: str  # the name the checkpoint records, else its folder name or file name without suffix
    weights_file: Path  # the file holding the weights (its bytes identify them)


def read_checkpoint(path: str | os.PathLike[str], towers: Towers = "both") -> Checkpoint:
    """Read a checkpoint file or folder.

    Args:
        path: any of the formats in this module's docstring.
        towers: "text" or "image" keep only that tower's tensors (from safetensors, the others are never read).

    Raises:
        CheckpointError: the file cannot be read as a CLIP checkpoint, or its keys are not CLIP's.
    """
    path = Path(path)
    if path.is_dir():
        return _read_folder(path, towers)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file or folder")
    if path.suffix == ".safetensors":
        hints = _open_clip_hints(path)
        state_dict, config = _read_safetensors(path, towers, hints=hints)
        return Checkpoint(state_dict, config, "open_clip" if hints else "safetensors", path.stem, path)
    raw, kind = _torch_load(path)
    if kind == "state_dict" and isinstance(raw.get("state_dict"), Mapping):
        raw, kind = raw["state_dict"], "open_clip"
    state_dict = _to_openai_layout(raw, path)
    config = CLIPConfig.from_state_dict(state_dict)
    # torch.load's tensors are memory-mapped: copy them so the model never depends on the file staying put.
    state_dict = _as_float32(CLIP.state_dict_for_towers(state_dict, towers), copy=kind != "torchscript")
    return Checkpoint(_inference_form(state_dict, config, towers), config, kind, path.stem, path)


def _read_folder(folder: Path, towers: Towers) -> Checkpoint:
    """Our own format, an open_clip hub folder, or a Hugging Face CLIPModel/SiglipModel folder."""
    weights = find_open_clip_weights(folder)
    if weights is not None and find_open_clip_config(folder) is not None:
        state_dict, config = _read_safetensors(weights, towers, hints=_open_clip_hints(weights))
        return Checkpoint(state_dict, config, "open_clip", folder.name, weights)
    try:
        meta = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"{folder}: a checkpoint folder needs a readable {CONFIG_FILE} ({e}); accepted: {ACCEPTED_FORMATS}"
        ) from e
    if meta.get("format") == FORMAT:
        if meta.get("version") != FORMAT_VERSION:
            raise CheckpointError(f"{folder}: checkpoint format version {meta.get('version')} is not supported")
        weights = folder / WEIGHTS_FILE
        state_dict, config = _read_safetensors(weights, towers, CLIPConfig.from_dict(meta["config"]))
        return Checkpoint(state_dict, config, "clipsearch", str(meta.get("name") or folder.name), weights)
    if meta.get("model_type") in ("clip", "siglip"):
        if meta["model_type"] == "clip":
            from retrieval.model.convert_hf import read_hf_folder
        else:
            from retrieval.model.convert_siglip import read_hf_folder

        state_dict, config = read_hf_folder(folder)
        weights = next(
            (folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file()), folder
        )
        state_dict = _as_float32(CLIP.state_dict_for_towers(state_dict, towers))
        return Checkpoint(state_dict, config, "huggingface", folder.name, weights)
    raise CheckpointError(
        f"{folder}: {CONFIG_FILE} is neither a clipsearch checkpoint nor a Hugging Face CLIP config "
        f"(model_type {meta.get('model_type')!r}); accepted: {ACCEPTED_FORMATS}"
    )


def _read_safetensors(
    path: Path, towers: Towers, config: CLIPConfig | None = None, hints: OpenClipHints | None = None
) -> tuple[dict[str, torch.Tensor], CLIPConfig]:
    """Read only the tensors of the towers asked for; without `config`, infer it from every tensor's shape.

    `hints` (from an open_clip_config.json) supply the activation, which shapes cannot tell; without them a
    CLIP gets OpenAI's QuickGELU and a SigLIP image tower exact GELU.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            # Shapes alone (on the meta device) are enough to infer the architecture and pick the tensors.
            shapes = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
            shapes = _to_openai_layout(shapes, path)
            if config is None:
                shown = {} if hints is None else hints._asdict()
                config = CLIPConfig.from_state_dict(
                    shapes, **{k: shown[k] for k in ("quick_gelu", "gelu_tanh", "image_size") if k in shown}
                )
            prefixed = {k.removeprefix("module."): k for k in f.keys()}
            state_dict = {k: f.get_tensor(prefixed[k]) for k in CLIP.state_dict_for_towers(shapes, towers)}
    except (SafetensorError, OSError) as e:
        # A file the user named may be no checkpoint at all; a checkpoint folder's weights file can only be damaged.
        raise unreadable_weights_error(path, e, accepted=config is None) from e
    return _inference_form(_as_float32(state_dict), config, towers), config


def _inference_form(state_dict: dict[str, torch.Tensor], config: CLIPConfig, towers: Towers) -> dict[str, torch.Tensor]:
    """A MobileCLIP2 state dict with its train-time branches fused (see `convert_mobileclip`); others as they are."""
    if config.family != "mobileclip":
        return state_dict
    from retrieval.model.convert_mobileclip import reparameterize_state_dict

    return reparameterize_state_dict(state_dict, config, towers)


def _open_clip_hints(weights: Path) -> OpenClipHints | None:
    """The hints of the open_clip_config.json beside a weights file, if there is one."""
    config_file = find_open_clip_config(weights)
    return None if config_file is None else read_hints(config_file)


def _torch_load(path: Path) -> tuple[dict[str, Any], str]:
    """Unpickle a .pt/.pth/.bin safely: a TorchScript archive's tensors (never its code), or a weights-only pickle."""
    is_zip = zipfile.is_zipfile(path)
    if is_zip:
        try:
            with zipfile.ZipFile(path) as archive:
                if is_torchscript_archive(archive.namelist()):
                    return read_torchscript_state_dict(archive, path), "torchscript"
        except (zipfile.BadZipFile, OSError) as e:
            raise unreadable_weights_error(path, e) from e
    try:
        # mmap (zip files only) means tensors of a tower that is then dropped are never read from disk.
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for foreign files
        raise unreadable_weights_error(path, e, accepted=True) from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict; accepted: {ACCEPTED_FORMATS}")
    return dict(obj), "state_dict"


def unreadable_weights_error(path: Path, error: BaseException, accepted: bool = False) -> CheckpointError:
    """The one-line error for a weights file that cannot be read: missing, cut short (saying how short), or damaged.

    Args:
        path: the file.
        error: what reading it raised.
        accepted: when nothing shows the file was cut short, list the formats this module reads (for a file the
            user named, which may be no checkpoint at all) instead of calling it damaged.
    """
    again = "download or copy it again"
    if not path.is_file():
        return CheckpointError(f"{path} is missing: {again}")
    shortfall = _shortfall(path)
    if shortfall:
        return CheckpointError(
            f"{path} is incomplete ({shortfall}), as an interrupted download or copy leaves it: {again}"
        )
    if accepted:
        return CheckpointError(
            f"cannot read {path} as a CLIP checkpoint ({_first_line(error)}); accepted: {ACCEPTED_FORMATS}"
        )
    return CheckpointError(f"cannot read {path} ({_first_line(error)}): the file is damaged; {again}")


def _shortfall(path: Path) -> str | None:
    """How a weights file shows it was cut short, if it does: a safetensors file shorter than its header says, or a
    zip (torch.save, TorchScript) without the directory a zip ends with."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(9)
        if head.startswith(b"PK\x03\x04") and not zipfile.is_zipfile(path):
            return f"{size} bytes of a zip archive whose end, the zip directory, is missing"
        # safetensors: the header's length as 8 little-endian bytes, the JSON header, then every tensor's bytes.
        header_size = int.from_bytes(head[:8], "little")
        if head[8:] != b"{" or header_size > _MAX_SAFETENSORS_HEADER:
            return None
        if 8 + header_size > size:
            return f"{size} bytes, fewer than its {8 + header_size}-byte header alone"
        f.seek(8)
        header = f.read(header_size)
    try:
        offsets = [entry["data_offsets"][1] for k, entry in json.loads(header).items() if k != "__metadata__"]
        expected = 8 + header_size + max(offsets, default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None
    return f"{size} of {expected} bytes" if isinstance(expected, int) and expected > size else None


def _first_line(error: BaseException) -> str:
    """The first line of an exception's message (torch's are often pages long)."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _to_openai_layout(raw: Mapping[str, Any], path: Path) -> dict[str, torch.Tensor]:
    """Strip `module.` prefixes and TorchScript-only scalars; reject Hugging Face keys and non-tensors."""
    state_dict: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        key = key.removeprefix("module.")
        if key in _TORCHSCRIPT_ONLY_KEYS:
            continue
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        state_dict[key] = value
    if any(k.startswith(("text_model.", "vision_model.")) for k in state_dict):
        raise CheckpointError(
            f"{path} holds Hugging Face CLIP weights; load the folder that contains it and its config.json instead"
        )
    return state_dict


def _as_float32(state_dict: Mapping[str, torch.Tensor], copy: bool = False) -> dict[str, torch.Tensor]:
    """Floating tensors as float32 (OpenAI ships fp16), others (BatchNorm counters) keep their dtype."""
    return {k: v.to(torch.float32 if v.is_floating_point() else v.dtype, copy=copy) for k, v in state_dict.items()}


@contextmanager
def _skip_init() -> Iterator[None]:
    """Build modules without random initialisation: the checkpoint's tensors replace every parameter anyway.

    The meta device would avoid the work too, but its kernel for normal_ imports torch._dynamo (1-2 s) on first use,
    which a one-shot query or index process pays in full; so torch.nn.init's functions do nothing for a moment (as
    Hugging Face's no_init_weights does) and the parameters stay as torch.empty allocated them.
    """
    names = [name for name in dir(nn.init) if name.endswith("_") and not name.startswith("_")]
    saved = {name: getattr(nn.init, name) for name in names}
    try:
        for name in names:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)


def build_model(checkpoint: Checkpoint, towers: Towers = "both", source: str | os.PathLike[str] = "") -> EmbeddingModel:
    """A CLIP, SigLIP or MobileCLIP (per the config's family) of the checkpoint's architecture, holding its tensors.

    Args:
        checkpoint: from `read_checkpoint`.
        towers: the towers to build; the checkpoint must hold their tensors.
        source: what to name in error messages (the path the user gave).

    Raises:
        CheckpointError: keys missing or unexpected, or tensors of the wrong shape.
    """
    with _skip_init():
        model = build_towers(checkpoint.config, towers=towers)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state_dict = CLIP.state_dict_for_towers(checkpoint.state_dict, towers)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_shape = [
        f"{k} {tuple(v.shape)} instead of {expected[k]}"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    problems = [
        f"{label} {len(keys)} keys ({', '.join(keys[:_SHOWN_KEYS])}{', ...' if len(keys) > _SHOWN_KEYS else ''})"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape for", wrong_shape))
        if keys
    ]
    if problems:
        raise CheckpointError(
            f"{source or checkpoint.weights_file}: the weights do not fit the CLIP architecture inferred for them: "
            + "; ".join(problems)
        )
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model


def save_checkpoint(
    model: EmbeddingModel,
    directory: str | os.PathLike[str],
    name: str | None = None,
    description: str = "",
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write a model in our own format: `config.json` plus `model.safetensors` (OpenAI key names).

    Both files are written to temporary names and renamed into place.

    Args:
        model: a CLIP with both towers.
        directory: the checkpoint folder (created if needed).
        name: the name `load_model` will report; default: `model.info.name` if set, else the folder's name.
        description: one line shown next to the name.
        dtype: storage dtype of the floating tensors (float16 halves the size; loading casts back to float32).

    Returns:
        The folder.
    """
    if model.towers != "both":
        raise ValueError("save_checkpoint needs a model with both towers (towers='both')")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    info = getattr(model, "info", None)
    name = name or (info.name if info is not None else directory.name)
    tensors = {
        k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
        for k, v in model.state_dict().items()
    }
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "name": name, "description": description}
    meta["config"] = model.config.to_dict()

    weights_tmp = _temp_path(directory, WEIGHTS_FILE)
    config_tmp = _temp_path(directory, CONFIG_FILE)
    try:
        save_file(tensors, str(weights_tmp), metadata={"format": "pt"})
        config_tmp.write_text(json.dumps(meta, indent=2) + "\n")
        # mkstemp (and safetensors) leave 0600; give the files the mode any new file gets, so a model is shareable
        umask = os.umask(0)
        os.umask(umask)
        for path in (weights_tmp, config_tmp):
            os.chmod(path, 0o666 & ~umask)
        os.replace(weights_tmp, directory / WEIGHTS_FILE)
        os.replace(config_tmp, directory / CONFIG_FILE)
        _copy_tokenizer(model, directory)
    finally:
        weights_tmp.unlink(missing_ok=True)
        config_tmp.unlink(missing_ok=True)
    logger.info("saved checkpoint %r to %s", name, directory)
    return directory


def _copy_tokenizer(model: EmbeddingModel, directory: Path) -> None:
    """Keep a hub tokenizer with the weights (SigLIP): its tokenizer.json and any tokenizer_config.json."""
    tokenizer_file = getattr(model, "tokenizer_file", None)
    if tokenizer_file is None:
        return
    for source in (tokenizer_file, tokenizer_file.parent / TOKENIZER_CONFIG_FILE):
        if source.is_file() and source.parent.resolve() != directory.resolve():
            shutil.copyfile(source, directory / source.name)


def _temp_path(directory: Path, final_name: str) -> Path:
    """A fresh temporary file next to where `final_name` will go."""
    fd, name = tempfile.mkstemp(dir=directory, prefix=f".{final_name}.", suffix=".part")
    os.close(fd)
    return Path(name)
