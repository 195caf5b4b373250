"""`load_model`: a registry name or a checkpoint path -> a ready CLIP and its preprocessing."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path

import torch

from retrieval.errors import CheckpointError
from retrieval.model.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    Checkpoint,
    build_model,
    read_checkpoint,
    save_checkpoint,
)
from retrieval.model.clip import CLIP, TOWERS, Towers
from retrieval.model.download import cache_dir, ensure_downloaded, file_sha256
from retrieval.model.files import TOKENIZER_FILE
from retrieval.model.hub import ensure_hub_files
from retrieval.model.identity import ModelInfo, tokenizer_identity
from retrieval.model.open_clip_files import find_open_clip_config, read_hints
from retrieval.model.preprocess import INTERPOLATIONS, RESIZE_MODES, Preprocess
from retrieval.model.registry import ModelSpec, check_model_name, default_model_name, get_spec, is_registered

logger = logging.getLogger(__name__)

# Recently loaded models, so a long-lived process (a server, a notebook) asking again gets them at once.
_CACHE_SIZE = 4
_cache: OrderedDict[tuple, tuple[CLIP, Preprocess]] = OrderedDict()
_cache_lock = threading.Lock()
# Marks a complete float32 copy of a downloaded checkpoint, with the hashes that tie it to the download.
_CONVERTED_MARK = "converted.json"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The torch device for a device name; "auto" picks cuda, then mps, then cpu."""
    if str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def load_model(
    name_or_path: str | os.PathLike[str] | None = None,
    device: str | torch.device = "auto",
    towers: Towers = "both",
) -> tuple[CLIP, Preprocess]:
    """Load a CLIP (or SigLIP) model by registry name or from a checkpoint file or folder.

    A registry name ("ViT-B/32", see `available_models()`) is downloaded into the cache dir on first use and
    verified (from OpenAI, or from a hub repository for OpenCLIP and SigLIP2 models); "shapes-mini" ships with
    the package. A path may be any format `read_checkpoint` reads. The same call again in the same process
    returns the same (shared) objects: copy the model before changing its weights.

    Args:
        name_or_path: a registry name or a path; None means `$CLIPSEARCH_MODEL`, else "MobileCLIP2-S0".
        device: "auto" (cuda, then mps, then cpu), or any torch device.
        towers: "text" builds and loads only the text tower (fast query start-up), "image" only the image
            tower. A model already loaded with both towers is returned as is.

    Returns:
        (model, preprocess): the model in eval mode, float32, on the device, with `model.info` set;
        preprocess maps a PIL image or a path to the [3, S, S] tensor the model expects.

    Raises:
        UnknownModelError: neither a registry name nor an existing path.
        ModelDownloadError: the weights could not be downloaded.
        CheckpointError: the checkpoint cannot be read or does not fit CLIP.

    Example:
        >>> model, preprocess = load_model("shapes-mini")
        >>> model.info.name
        'shapes-mini'
    """
    if towers not in TOWERS:
        raise ValueError(f"towers must be one of {TOWERS}, got {towers!r}")
    name = default_model_name() if name_or_path is None else os.fspath(name_or_path)
    target = resolve_device(device)

    registry_sha = None
    spec = None
    if is_registered(name):
        spec = get_spec(name)
        name = spec.name
        if spec.bundled:
            source = spec.path
            if not (source / CONFIG_FILE).is_file():
                raise CheckpointError(
                    f"the bundled model {name!r} is missing from this installation (no {source / CONFIG_FILE}); "
                    "reinstall clipsearch, or choose another model"
                )
        elif spec.on_hub:
            # Hub weights are safetensors already: memory-mapped and read per tower, no float32 copy needed.
            source = ensure_hub_files(spec)
        else:
            source = _float32_copy(ensure_downloaded(spec), spec)
            registry_sha = spec.sha256
    else:
        check_model_name(name)
        source = Path(name).expanduser()
        name = ""  # taken from the checkpoint below

    key = (str(source.resolve()), _stamp(source), name, str(target))
    with _cache_lock:
        for wanted in (towers, "both"):
            if (key, wanted) in _cache:
                _cache.move_to_end((key, wanted))
                return _cache[(key, wanted)]

    start = time.perf_counter()
    checkpoint = read_checkpoint(source, towers=towers)
    if spec is not None and spec.quick_gelu is not None and checkpoint.config.quick_gelu != spec.quick_gelu:
        checkpoint = checkpoint._replace(config=dataclasses.replace(checkpoint.config, quick_gelu=spec.quick_gelu))
    model = build_model(checkpoint, towers=towers, source=source).to(target).eval()
    config = checkpoint.config
    preprocess = _preprocess_for(checkpoint)
    if config.family == "siglip":
        model.tokenizer_file = _tokenizer_file(checkpoint.weights_file)
    model.info = ModelInfo(
        name=name or checkpoint.name,
        weights_sha256=registry_sha or _weights_sha256(checkpoint.weights_file),
        embed_dim=config.embed_dim,
        image_size=config.vision.image_size,
        mean=preprocess.mean,
        std=preprocess.std,
        resize_mode=preprocess.resize_mode,
        tokenizer=tokenizer_identity(model),
        interpolation=preprocess.interpolation,
    )
    loaded = (model, preprocess)
    logger.info(
        "loaded %s (%s, towers=%s) on %s in %.2f s",
        model.info.name,
        checkpoint.format,
        towers,
        target,
        time.perf_counter() - start,
    )
    with _cache_lock:
        _cache[(key, towers)] = loaded
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return loaded


def forget(model: CLIP) -> None:
    """Drop a model from the loaded models `load_model` keeps, so its weights are freed once the caller lets go of it
    too (an index run that encodes in ONNX Runtime needs no torch weights beside its session's)."""
    with _cache_lock:
        for key in [key for key, (cached, _) in _cache.items() if cached is model]:
            del _cache[key]


def _float32_copy(downloaded: Path, spec: ModelSpec) -> Path:
    """A float32 copy of a downloaded checkpoint in our own format, written on first use; else the download.

    OpenAI's releases are fp16 TorchScript archives: unpickling one and casting it to float32 takes ~0.8 s for
    ViT-B/32's text tower on every load, while our format's safetensors file is memory-mapped, only the tower
    asked for (0.01 s; measured on this project's 2-core CPU). The price is disk space (the float32 copy is
    twice the download) and a one-time ~4 s on the first load. The copy lives in the cache dir under the
    download's verified SHA-256 and is itself checked against the SHA-256 recorded when it was written
    (remembered per size/mtime/inode like the download's, so this costs a stat on later loads); a damaged or
    partial copy is written again.
    """
    target = cache_dir() / "float32" / str(spec.sha256)
    try:
        mark = json.loads((target / _CONVERTED_MARK).read_text())
        if mark.get("source_sha256") == spec.sha256 and mark.get("weights_sha256") == file_sha256(
            target / WEIGHTS_FILE
        ):
            return target
    except (OSError, ValueError):
        pass
    try:
        checkpoint = read_checkpoint(downloaded)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part"))
        try:
            save_checkpoint(build_model(checkpoint, source=downloaded), staging, name=spec.name)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        # Written last (hashing the file at its final path, so the hash memo keeps that path): a copy without
        # its mark, e.g. after a crash, is simply written again.
        mark = {"source_sha256": spec.sha256, "weights_sha256": file_sha256(target / WEIGHTS_FILE)}
        marking = target / f".{_CONVERTED_MARK}.part"
        marking.write_text(json.dumps(mark) + "\n")
        os.replace(marking, target / _CONVERTED_MARK)
    except OSError as e:  # a read-only or full cache dir: load the download itself, as before
        logger.warning("could not write a float32 copy of %s (%s); loading the download directly", downloaded, e)
        return downloaded
    logger.info("wrote a float32 copy of %s to %s for faster loading", downloaded.name, target)
    return target


def _preprocess_for(checkpoint: Checkpoint) -> Preprocess:
    """The family's preprocessing, or what the open_clip_config.json beside the weights prescribes.

    Raises:
        CheckpointError: the open_clip config asks for preprocessing we do not implement.
    """
    preprocess = Preprocess.from_config(checkpoint.config)
    config_file = find_open_clip_config(checkpoint.weights_file)
    if config_file is None:
        return preprocess
    cfg = read_hints(config_file).preprocess
    interpolation = cfg.get("interpolation", preprocess.interpolation)
    resize_mode = cfg.get("resize_mode", preprocess.resize_mode)
    if interpolation not in INTERPOLATIONS or resize_mode not in RESIZE_MODES:
        raise CheckpointError(
            f"{config_file} asks for {interpolation} resizing in {resize_mode!r} mode; clipsearch implements "
            f"{' and '.join(INTERPOLATIONS)} resizing in the modes {', '.join(RESIZE_MODES)}"
        )
    return Preprocess(
        image_size=preprocess.image_size,
        mean=tuple(float(x) for x in cfg.get("mean", preprocess.mean)),
        std=tuple(float(x) for x in cfg.get("std", preprocess.std)),
        fast=preprocess.fast,
        resize_mode=resize_mode,
        interpolation=interpolation,
    )


def _tokenizer_file(weights: Path) -> Path | None:
    """The tokenizer.json of a hub model: in the checkpoint folder, i.e. beside its weights file."""
    candidate = (weights if weights.is_dir() else weights.parent) / TOKENIZER_FILE
    return candidate if candidate.is_file() else None


def _stamp(path: Path) -> tuple:
    """What changes when a checkpoint file (or any file of a checkpoint folder) is rewritten."""
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return tuple((p.name, (s := p.stat()).st_size, s.st_mtime_ns, s.st_ino) for p in files)


def _weights_sha256(weights: Path) -> str:
    """The SHA-256 of the weights file; for a folder of shards, a digest over every shard's hash."""
    if weights.is_file():
        return file_sha256(weights)
    digest = hashlib.sha256()
    for shard in sorted(p for p in weights.iterdir() if p.suffix in (".safetensors", ".bin", ".pt")):
        digest.update(f"{shard.name}:{file_sha256(shard)}\n".encode())
    return digest.hexdigest()
