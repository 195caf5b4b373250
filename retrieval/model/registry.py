"""Named models: OpenAI's published CLIP checkpoints, OpenCLIP, SigLIP2 and MobileCLIP2 weights from the hub
(downloaded on first use), and the bundled shapes-mini; and the default among them."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrieval.errors import UnknownModelError

# Issue 13's rule: the highest published Flickr30k text->image R@1 among the models whose image encoding on a
# 2-core CPU, in the runtime `index` uses there (ONNX Runtime fp32), is no slower than ViT-B/32's, measured side
# by side (`speed_vs_vit_b32` below, README "Models"). MobileCLIP2-S0: 69.2 against ViT-B/32's 58.8, at 0.67x its
# time per image (quartiles 0.56-0.79; five more runs 0.56-0.80x); the more accurate S2 (1.9x) and SigLIP2 B/32
# (1.45x; 1.35-1.37x in three more runs, one outlier at 1.02x) are slower. Stores filled by another model keep
# it (`clipsearch.library.default_model_for`).
DEFAULT_MODEL = "MobileCLIP2-S0"
ASSETS_DIR = Path(__file__).resolve().parent / "assets"

_OPENAI_BASE = "https://openaipublic.azureedge.net/clip/models"
_REVISION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*")  # "main", "v1.0", "refs/pr/1"
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry: where a named model's weights come from, and what `clipsearch models` shows."""

    name: str  # what users type ("ViT-B/32")
    description: str  # one line for `clipsearch models`
    url: str | None = None  # download URL; None for a bundled model
    sha256: str | None = None  # hex SHA-256 of the downloaded file, checked after every download
    path: Path | None = None  # bundled models: the checkpoint folder inside the package
    # Hub models: files of a Hugging Face-style repository at a revision (see hub.py).
    hub_repo: str | None = None  # "owner/name" on the hub
    revision: str = "main"  # a commit hash pins the files (URL and cache folder); a branch name follows it
    files: tuple[str, ...] = ()  # the files to fetch: weights, open_clip_config.json, tokenizer files
    file_sha256: tuple[tuple[str, str], ...] = ()  # (file, SHA-256) pins; unpinned files use the hub's hash
    quick_gelu: bool | None = None  # overrides the hub config's activation when it is known to be wrong
    # For the `clipsearch models` table.
    family: str = "CLIP"  # "CLIP", "OpenCLIP", "SigLIP2", "MobileCLIP2"
    embed_dim: int | None = None  # embedding length
    download_mb: float | None = None  # approximate download size
    flickr_t2i_r1: float | None = None  # published zero-shot Flickr30k text->image recall@1, in %
    flickr_source: str = ""  # where that figure is published
    arch: str | None = None  # the config preset with its architecture (benchmarks build it with random weights)
    # Image encoding's images/s relative to ViT-B/32 in ONNX Runtime fp32 (what `index` runs on a CPU), measured by
    # `benchmarks/encode_speed.py --families` on a 2-core Intel Xeon (AVX-512, VNNI, AMX); None: not measured.
    speed_vs_vit_b32: float | None = None

    def __post_init__(self) -> None:
        # The revision becomes part of a URL and of a cache folder's name: nothing that could climb out of either.
        if not _REVISION.fullmatch(self.revision) or ".." in self.revision.split("/"):
            raise ValueError(
                f"model {self.name!r}: revision {self.revision!r} is not a commit hash or a branch or tag name; "
                'pin a commit with its 40-hex-digit hash, or follow a branch such as "main"'
            )

    @property
    def pinned(self) -> bool:
        """True when the revision is a commit hash, so the files cannot change under the same name."""
        return _COMMIT.fullmatch(self.revision) is not None

    @property
    def bundled(self) -> bool:
        """True when the weights ship inside the package instead of being downloaded."""
        return self.path is not None

    @property
    def on_hub(self) -> bool:
        """True when the model's files come from a hub repository."""
        return self.hub_repo is not None

    @property
    def filename(self) -> str:
        """The downloaded file's name in the cache dir (the URL's last segment)."""
        if self.url is None:
            raise ValueError(f"model {self.name!r} is bundled and has no download URL")
        return self.url.rstrip("/").rsplit("/", 1)[-1]


# Published zero-shot Flickr30k text->image recall@1 (1k test set), from open_clip's benchmark table.
_OPEN_CLIP_RESULTS = "open_clip docs/openclip_retrieval_results.csv (Flickr image retr. R@1)"
_MOBILECLIP_RESULTS = "apple/ml-mobileclip results/mobileclip2_s*.jsonl (Flickr image_retrieval_recall@1)"


def _openai(
    name: str,
    sha256: str,
    filename: str,
    description: str,
    embed_dim: int,
    download_mb: float,
    flickr: float,
    speed: float | None = None,
) -> ModelSpec:
    """An OpenAI release, whose URL carries the file's SHA-256 as its second-last segment."""
    return ModelSpec(
        name,
        description,
        url=f"{_OPENAI_BASE}/{sha256}/{filename}",
        sha256=sha256,
        family="CLIP",
        embed_dim=embed_dim,
        download_mb=download_mb,
        flickr_t2i_r1=flickr,
        flickr_source=_OPEN_CLIP_RESULTS,
        arch=name,
        speed_vs_vit_b32=speed,
    )


# Hub files are fetched at revision "main" and verified against the SHA-256 the hub announces for each. An entry
# is pinned by giving `revision` a commit hash (and `file_sha256` the files' hashes), which the download URL and
# the cache folder then use; finding those needs a machine that can reach the hub, which this registry was not
# written on, so every entry still follows "main".
_OPEN_CLIP_FILES = ("open_clip_config.json", "open_clip_model.safetensors")
_SIGLIP2_FILES = (*_OPEN_CLIP_FILES, "tokenizer.json", "tokenizer_config.json")


def _hub(
    name: str, repo: str, files: tuple[str, ...], description: str, revision: str = "main", **table: Any
) -> ModelSpec:
    """A model whose files come from a hub repository at a revision (a commit hash pins it)."""
    return ModelSpec(name, description, hub_repo=repo, revision=revision, files=files, **table)


_REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        _openai(
            "RN50",
            "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762",
            "RN50.pt",
            "OpenAI CLIP ResNet-50, 224 px, 1024-d",
            embed_dim=1024,
            download_mb=244,
            flickr=57.36,
        ),
        _openai(
            "RN101",
            "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599",
            "RN101.pt",
            "OpenAI CLIP ResNet-101, 224 px, 512-d",
            embed_dim=512,
            download_mb=278,
            flickr=58.04,
        ),
        _openai(
            "RN50x4",
            "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd",
            "RN50x4.pt",
            "OpenAI CLIP ResNet-50 x4 width, 288 px, 640-d",
            embed_dim=640,
            download_mb=402,
            flickr=62.58,
        ),
        _openai(
            "RN50x16",
            "52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa",
            "RN50x16.pt",
            "OpenAI CLIP ResNet-50 x16 width, 384 px, 768-d",
            embed_dim=768,
            download_mb=630,
            flickr=65.34,
        ),
        _openai(
            "RN50x64",
            "be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c",
            "RN50x64.pt",
            "OpenAI CLIP ResNet-50 x64 width, 448 px, 1024-d",
            embed_dim=1024,
            download_mb=1260,
            flickr=68.98,
        ),
        _openai(
            "ViT-B/32",
            "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af",
            "ViT-B-32.pt",
            "OpenAI CLIP ViT-B/32, 224 px, 512-d (the default until MobileCLIP2-S0)",
            embed_dim=512,
            download_mb=338,
            flickr=58.78,
            speed=1.0,
        ),
        _openai(
            "ViT-B/16",
            "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
            "ViT-B-16.pt",
            "OpenAI CLIP ViT-B/16, 224 px, 512-d",
            embed_dim=512,
            download_mb=335,
            flickr=62.16,
            speed=0.23,  # the architecture ViT-B-16/dfn2b was measured with
        ),
        _openai(
            "ViT-L/14",
            "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836",
            "ViT-L-14.pt",
            "OpenAI CLIP ViT-L/14, 224 px, 768-d",
            embed_dim=768,
            download_mb=890,
            flickr=64.96,
        ),
        _openai(
            "ViT-L/14@336px",
            "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
            "ViT-L-14-336px.pt",
            "OpenAI CLIP ViT-L/14 at 336 px, 768-d (the most accurate, the slowest)",
            embed_dim=768,
            download_mb=891,
            flickr=66.9,
        ),
        _hub(
            "ViT-B-32/laion2b_s34b_b79k",
            "laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
            _OPEN_CLIP_FILES,
            "OpenCLIP ViT-B/32 trained on LAION-2B, 224 px, 512-d (GELU)",
            family="OpenCLIP",
            embed_dim=512,
            download_mb=605,
            flickr_t2i_r1=66.78,
            flickr_source=_OPEN_CLIP_RESULTS,
            arch="ViT-B-32",
            speed_vs_vit_b32=1.06,
        ),
        _hub(
            "ViT-B-32-256/datacomp_s34b_b86k",
            "laion/CLIP-ViT-B-32-256x256-DataComp-s34B-b86K",
            _OPEN_CLIP_FILES,
            "OpenCLIP ViT-B/32 trained on DataComp-1B, 256 px, 512-d (GELU)",
            family="OpenCLIP",
            embed_dim=512,
            download_mb=605,
            flickr_t2i_r1=64.92,
            flickr_source=_OPEN_CLIP_RESULTS,
            arch="ViT-B-32-256",
            speed_vs_vit_b32=0.77,
        ),
        _hub(
            "ViT-B-16/dfn2b",
            "apple/DFN2B-CLIP-ViT-B-16",
            _OPEN_CLIP_FILES,
            "Apple DFN ViT-B/16 trained on DFN-2B, 224 px, 512-d (QuickGELU)",
            quick_gelu=True,  # open_clip's pretrained table says so; its hub config may not
            family="OpenCLIP",
            embed_dim=512,
            download_mb=599,
            flickr_t2i_r1=69.12,
            flickr_source=_OPEN_CLIP_RESULTS,
            arch="ViT-B/16",
            speed_vs_vit_b32=0.23,
        ),
        _hub(
            "ViT-B-32-SigLIP2-256",
            "timm/ViT-B-32-SigLIP2-256",
            _SIGLIP2_FILES,
            "Google SigLIP2 ViT-B/32, 256 px, 768-d, multilingual (Gemma tokenizer)",
            family="SigLIP2",
            embed_dim=768,
            download_mb=1520,
            arch="ViT-B-32-SigLIP2-256",
            speed_vs_vit_b32=0.69,
        ),
        _hub(
            "ViT-B-16-SigLIP2-256",
            "timm/ViT-B-16-SigLIP2-256",
            _SIGLIP2_FILES,
            "Google SigLIP2 ViT-B/16, 256 px, 768-d, multilingual (Gemma tokenizer)",
            family="SigLIP2",
            embed_dim=768,
            download_mb=1500,
            arch="ViT-B-16-SigLIP2-256",
            speed_vs_vit_b32=0.18,
        ),
        _hub(
            "MobileCLIP2-S0",
            "timm/MobileCLIP2-S0-OpenCLIP",
            _OPEN_CLIP_FILES,
            "Apple MobileCLIP2-S0 (FastViT-MCi0) trained on DFNDR-2B, 256 px, 512-d (the default)",
            family="MobileCLIP2",
            embed_dim=512,
            download_mb=300,
            flickr_t2i_r1=69.22,
            flickr_source=_MOBILECLIP_RESULTS,
            arch="MobileCLIP2-S0",
            speed_vs_vit_b32=1.49,
        ),
        _hub(
            "MobileCLIP2-S2",
            "timm/MobileCLIP2-S2-OpenCLIP",
            _OPEN_CLIP_FILES,
            "Apple MobileCLIP2-S2 (FastViT-MCi2) trained on DFNDR-2B, 256 px, 512-d",
            family="MobileCLIP2",
            embed_dim=512,
            download_mb=397,
            flickr_t2i_r1=74.82,
            flickr_source=_MOBILECLIP_RESULTS,
            arch="MobileCLIP2-S2",
            speed_vs_vit_b32=0.54,
        ),
        ModelSpec(
            "shapes-mini",
            "tiny CLIP trained on generated shapes; bundled, works offline (demo and tests)",
            path=ASSETS_DIR / "shapes-mini",
            embed_dim=64,
        ),
    )
}


def available_models() -> list[str]:
    """Names `load_model` accepts besides paths, in registry order.

    Example:
        >>> "ViT-B/32" in available_models()
        True
    """
    return list(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The registry entry for a name (exact, else case-insensitive).

    Raises:
        UnknownModelError: no such name; the message lists the available ones.
    """
    spec = _REGISTRY.get(name)
    if spec is not None:
        return spec
    matches = [s for key, s in _REGISTRY.items() if key.lower() == name.lower()]
    if len(matches) == 1:
        return matches[0]
    raise UnknownModelError(
        f"unknown model {name!r}; available: {', '.join(available_models())} (or give a checkpoint file or folder)"
    )


def is_registered(name: str) -> bool:
    """Whether `get_spec(name)` would succeed."""
    return name in _REGISTRY or sum(key.lower() == name.lower() for key in _REGISTRY) == 1


def check_model_name(name: str) -> None:
    """Refuse, before anything heavy is imported or loaded, a model that is neither a registry name nor a path.

    Raises:
        UnknownModelError: the message lists the available names.
    """
    if not is_registered(name) and not Path(name).expanduser().exists():
        raise UnknownModelError(
            f"unknown model {name!r}: not a registry name and no file or folder at that path; "
            f"available: {', '.join(available_models())}"
        )


def known_identity(name: str) -> tuple[str, str] | None:
    """(name, weights SHA-256) that `load_model(name)` records in the model's `ModelInfo`, known without loading
    it (so without torch): a download's pinned hash; for a hub model, the hash its weights file was verified with,
    once all its files are cached (`hub.cached_weights_sha256`); for a bundled model or a clipsearch checkpoint
    folder, the hash of its weights file (remembered in the cache dir, `download.file_sha256`). None for a hub
    model not fetched yet, and for checkpoints in other formats.
    """
    from retrieval.model.download import file_sha256
    from retrieval.model.files import CONFIG_FILE, FORMAT, FORMAT_VERSION, WEIGHTS_FILE

    if is_registered(name):
        spec = get_spec(name)
        if spec.bundled:
            folder, recorded = spec.path, spec.name
        elif spec.on_hub:
            from retrieval.model.hub import cached_weights_sha256

            sha256 = cached_weights_sha256(spec)
            return None if sha256 is None else (spec.name, sha256)
        elif spec.sha256 is None:
            return None
        else:
            return spec.name, spec.sha256
    else:
        from retrieval.model.open_clip_files import find_open_clip_weights

        folder = Path(name).expanduser()
        try:
            meta = json.loads((folder / CONFIG_FILE).read_text())
        except (OSError, ValueError):
            return None
        # as `checkpoint._read_folder` tells the formats apart
        if find_open_clip_weights(folder) is not None or not isinstance(meta, dict):
            return None
        if (meta.get("format"), meta.get("version")) != (FORMAT, FORMAT_VERSION):
            return None
        recorded = str(meta.get("name") or folder.name)
    try:
        return recorded, file_sha256(folder / WEIGHTS_FILE)
    except OSError:
        return None


def register_model(spec: ModelSpec) -> None:
    """Add (or replace) a named model, e.g. a mirror of a checkpoint on a local server.

    Args:
        spec: a downloadable entry (`url` and `sha256` set), a hub entry (`hub_repo` and `files` set) or a
            bundled/local one (`path` set).

    Raises:
        ValueError: the spec has none of these.
    """
    if spec.path is None and not (spec.hub_repo and spec.files) and (spec.url is None or spec.sha256 is None):
        raise ValueError(f"model {spec.name!r} needs a url and its sha256, a hub repository and files, or a path")
    _REGISTRY[spec.name] = spec


def default_model_name() -> str:
    """The model used when none is named and no store says otherwise: `$CLIPSEARCH_MODEL`, else `DEFAULT_MODEL`."""
    return os.environ.get("CLIPSEARCH_MODEL") or DEFAULT_MODEL
