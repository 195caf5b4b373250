"""Encode speed on CPU: our CLIP in torch and in ONNX Runtime (fp32 and int8, the runtime `clipsearch index` uses
on a CPU) against openai/CLIP's reference `model.py`, or every model family against ViT-B/32 (`--families`), in
the same run.

Measures image embeddings per second at one batch size and the latency of embedding one short text query.
`encoder_images_per_s` is also what `index_speed.py` reports as encoder-only throughput, so the two agree.
The reference is the `clip/model.py` shipped in the `clip-anytorch` wheel, loaded by file path (it needs only
torch), so no `clip` package lands on the import path. With `--families`, each registry model's architecture
is built with random weights of its real size (speed does not depend on the weights' values, so nothing is
downloaded) and compared with ViT-B/32. Runs alternate between the models and the figures are medians,
because the CPU may be shared.

    python benchmarks/encode_speed.py
    python benchmarks/encode_speed.py --reference-model-py /path/to/clip/model.py --repeats 9
    python benchmarks/encode_speed.py --families --threads 2
    python benchmarks/encode_speed.py --families --models ViT-B/32 ViT-B-16-SigLIP2-256
    python benchmarks/encode_speed.py --families --models MobileCLIP2-S0 MobileCLIP2-S2 --threads 2
    python benchmarks/encode_speed.py --batch-size 8 --reference-model-py clip/model.py
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import operator
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import nn

from retrieval.model.clip import CLIP
from retrieval.model.config import PRESETS, CLIPConfig
from retrieval.model.family import build_towers
from retrieval.model.identity import ModelInfo
from retrieval.model.registry import available_models, get_spec
from retrieval.model.tokenizer import tokenize

ARCH = "ViT-B/32"  # architecture preset; weights are random
BATCH_SIZE = 32  # images per encode_image call
REPEATS = 11  # timed image batches per model
TEXT_RUNS = 50  # timed single-query text encodings per model
WARMUP = 2  # untimed calls per model and task first
PROMPT = "a photo of a red bicycle"  # a 6-word query
SEED = 0
BASELINE = "ViT-B/32"  # --families: every model is compared with this one
# --families: one model of each family and image size; any registry name with an architecture can be given.
FAMILY_MODELS = (
    "ViT-B/32",
    "ViT-B-32/laion2b_s34b_b79k",
    "ViT-B-32-256/datacomp_s34b_b86k",
    "ViT-B-16/dfn2b",
    "ViT-B-32-SigLIP2-256",
    "ViT-B-16-SigLIP2-256",
    "MobileCLIP2-S0",
    "MobileCLIP2-S2",
)


def load_reference(model_py: Path | None) -> ModuleType:
    """Import openai/CLIP's model.py by path, from --reference-model-py or the installed clip-anytorch wheel."""
    if model_py is None:
        try:
            model_py = Path(importlib.metadata.distribution("clip-anytorch").locate_file("clip/model.py"))
        except importlib.metadata.PackageNotFoundError:
            raise SystemExit(
                "the reference implementation is not installed: run `pip install clip-anytorch --no-deps` "
                "(or `pip download clip-anytorch --no-deps` and unzip it), then pass "
                "--reference-model-py <dir>/clip/model.py"
            ) from None
    if not model_py.is_file():
        raise SystemExit(f"reference model file {model_py} does not exist; pass --reference-model-py clip/model.py")
    spec = importlib.util.spec_from_file_location("reference_clip_model", model_py)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_reference(module: ModuleType, config: CLIPConfig, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """The reference CLIP in fp32 with our weights (its build_model would convert them to fp16)."""
    vision, text = config.vision, config.text
    model = module.CLIP(
        config.embed_dim,
        vision.image_size,
        vision.layers,
        vision.width,
        vision.patch_size,
        text.context_length,
        text.vocab_size,
        text.width,
        text.heads,
        text.layers,
    )
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def cpu_description() -> str:
    """The CPU's model name and the vector/matrix extensions that decide encoder speed (from /proc/cpuinfo)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        import platform

        return platform.processor() or "unknown CPU"
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    name = fields.get("model name\t", "unknown CPU").strip()
    flags = set(fields.get("flags\t\t", "").split())
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    present = [f for f in wanted if f in flags]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name}, {cores} cores usable, flags: {' '.join(present) or 'none of ' + '/'.join(wanted)}"


def onnx_encoders(model: nn.Module) -> dict[str, object]:
    """The model's image tower in ONNX Runtime, fp32 and int8, as `clipsearch index` runs it on a CPU."""
    from retrieval.model.onnx_export import ensure_export
    from retrieval.model.onnx_runtime import OnnxEncoder

    return {p: OnnxEncoder.open(ensure_export(model, p, "image"), towers="image") for p in ("float32", "int8")}


def encoder_images_per_s(encode: Callable[[np.ndarray], object], pixels: np.ndarray, batch: int, repeats: int) -> float:
    """Images/s of one encoder over `pixels` in batches: the median of `repeats` passes after one warm-up batch."""
    encode(pixels[:batch])
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(pixels), batch):
            encode(pixels[i : i + batch])
        rates.append(len(pixels) / (time.perf_counter() - start))
    return statistics.median(rates)


def time_interleaved(calls: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Wall-clock seconds of each call, alternating which model goes first so drifts in CPU load hit both."""
    with torch.inference_mode():
        for call in calls.values():
            for _ in range(warmup):
                call()
        times: dict[str, list[float]] = {name: [] for name in calls}
        order = list(calls)
        for i in range(repeats):
            for name in order if i % 2 == 0 else order[::-1]:
                start = time.perf_counter()
                calls[name]()
                times[name].append(time.perf_counter() - start)
    return times


def family_tokens(config: CLIPConfig, prompt: str) -> torch.Tensor:
    """One query's token ids as the model's family feeds them: CLIP's BPE ids, or SigLIP's fixed-length row.

    CLIP runs up to the end-of-text token; MobileCLIP2 has CLIP's tokenizer but runs all 77 positions. SigLIP's
    tokenizer.json is a download; its text tower always runs all positions, so random ids of the full context
    length cost the same as the real ones.
    """
    if config.family in ("clip", "mobileclip"):
        return torch.from_numpy(tokenize(prompt, context_length=config.text.context_length))  # [1, L]
    generator = torch.Generator().manual_seed(SEED)
    return torch.randint(0, config.text.vocab_size, (1, config.text.context_length), generator=generator)


def run_families(args: argparse.Namespace) -> None:
    """Images/s and one-query text latency of each model's architecture, next to ViT-B/32's, in one run."""
    names = [BASELINE] + [n for n in args.models if n != BASELINE]
    configs = {}
    for name in names:
        arch = get_spec(name).arch
        if arch not in PRESETS:
            raise SystemExit(f"{name} has no architecture preset to build; choose from {', '.join(available_models())}")
        configs[name] = PRESETS[arch]
    torch.manual_seed(SEED)
    text_of, texts, calls_image, calls_text = {}, {}, {}, {}
    for name, config in configs.items():
        image_tower = build_towers(config, towers="image").eval()
        size = config.vision.image_size
        pixels = torch.randn(args.batch_size, 3, size, size, generator=torch.Generator().manual_seed(SEED))
        calls_image[name] = lambda m=image_tower, p=pixels: m.encode_image(p)
        # Models with the same text tower (architecture and activation) share one timing.
        text_key = (config.family, config.text, config.quick_gelu)
        if text_key not in texts:
            texts[text_key] = (build_towers(config, towers="text").eval(), family_tokens(config, args.prompt))
            tower, tokens = texts[text_key]
            calls_text[text_key] = lambda m=tower, t=tokens: m.encode_text(t)
        text_of[name] = text_key
    print(f"random weights, fp32 CPU, {torch.get_num_threads()} threads, torch {torch.__version__}")
    image_times = time_interleaved(calls_image, args.repeats, args.warmup)
    text_times = time_interleaved(calls_text, args.text_runs, args.warmup)
    rate = {name: args.batch_size / statistics.median(t) for name, t in image_times.items()}
    latency = {name: 1000 * statistics.median(text_times[key]) for name, key in text_of.items()}
    header = f"images/s (b{args.batch_size})"
    print(f"\n{'model':<34} {'arch':<22} {header:>15} {'vs B/32':>8} {'img time':>9} {'text ms':>8} {'vs B/32':>8}")
    rows = []
    for name, config in configs.items():
        speed, slower = rate[name] / rate[BASELINE], latency[name] / latency[BASELINE]
        arch = get_spec(name).arch
        # "img time": the image tower's CPU time per image relative to ViT-B/32's (1 / the images/s ratio).
        print(
            f"{name:<34} {arch:<22} {rate[name]:>15.2f} {speed:>7.2f}x {1 / speed:>8.2f}x "
            f"{latency[name]:>8.2f} {slower:>7.2f}x"
        )
        rows.append(
            {
                "model": name,
                "arch": arch,
                "family": config.family,
                "images_per_s": round(rate[name], 3),
                "speed_vs_baseline": round(speed, 4),
                "image_time_vs_baseline": round(1 / speed, 4),
                "text_latency_ms": round(latency[name], 3),
                "latency_vs_baseline": round(slower, 4),
            }
        )
    print(
        json.dumps(
            {"baseline": BASELINE, "threads": torch.get_num_threads(), "batch_size": args.batch_size, "models": rows}
        )
    )


def main() -> None:
    """Run the benchmark and print a table, the ratios and one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default=ARCH, choices=sorted(PRESETS), help="architecture preset (random weights)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="images per encode call")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="timed image batches per model")
    parser.add_argument("--text-runs", type=int, default=TEXT_RUNS, help="timed single-query text encodings")
    parser.add_argument("--warmup", type=int, default=WARMUP, help="untimed calls first")
    parser.add_argument("--prompt", default=PROMPT, help="the text query")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--reference-model-py", type=Path, default=None, help="path to openai/CLIP's clip/model.py")
    parser.add_argument("--families", action="store_true", help="compare model families with ViT-B/32 instead")
    parser.add_argument("--models", nargs="+", default=list(FAMILY_MODELS), help="--families: registry names")
    args = parser.parse_args()
    if args.families:
        if args.threads:
            torch.set_num_threads(args.threads)
        run_families(args)
        return

    reference_module = load_reference(args.reference_model_py)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    config = PRESETS[args.arch]
    ours = CLIP(config).eval()
    reference = build_reference(reference_module, config, ours.state_dict())

    size = config.vision.image_size
    pixels = torch.randn(args.batch_size, 3, size, size, generator=torch.Generator().manual_seed(SEED))
    tokens = torch.from_numpy(tokenize(args.prompt))  # [1, 77]
    with torch.inference_mode():
        ref_image = reference.encode_image(pixels[:4]).float()
        ref_text = reference.encode_text(tokens).float()
        image_diff = (ours.encode_image(pixels[:4]) - ref_image / ref_image.norm(dim=-1, keepdim=True)).abs().max()
        text_diff = (ours.encode_text(tokens) - ref_text / ref_text.norm(dim=-1, keepdim=True)).abs().max()
    print(f"{args.arch}, random weights, fp32 CPU, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"same weights, normalised embeddings max |ours - reference|: image {image_diff:.2e}, text {text_diff:.2e}")
    print(f"prompt {args.prompt!r}: {int(tokens.argmax()) + 1} real tokens of {tokens.shape[1]}")

    ours.info = ModelInfo.for_model(ours, f"{args.arch} random")
    onnx = onnx_encoders(ours)
    print(cpu_description())
    numpy_pixels = pixels.numpy()
    image_times = time_interleaved(
        {
            "ours": lambda: ours.encode_image(pixels),
            "reference": lambda: reference.encode_image(pixels),
            "onnx fp32": lambda: onnx["float32"].encode_images(numpy_pixels),
            "onnx int8": lambda: onnx["int8"].encode_images(numpy_pixels),
        },
        args.repeats,
        args.warmup,
    )
    text_times = time_interleaved(
        {"ours": lambda: ours.encode_text(tokens), "reference": lambda: reference.encode_text(tokens)},
        args.text_runs,
        args.warmup,
    )
    throughput = {name: args.batch_size / statistics.median(t) for name, t in image_times.items()}
    latency_ms = {name: 1000 * statistics.median(t) for name, t in text_times.items()}

    print(f"\n{'':<10} {f'images/s (batch {args.batch_size})':>24} {'text latency ms (1 query)':>27}")
    for name in throughput:
        print(f"{name:<10} {throughput[name]:>24.2f} {latency_ms.get(name, float('nan')):>27.2f}")
    throughput_ratio = throughput["ours"] / throughput["reference"]
    latency_ratio = latency_ms["ours"] / latency_ms["reference"]
    # Each pair ran back to back, so its ratio cancels most of the drift in what else the CPU is doing.
    paired_throughput = statistics.median(map(operator.truediv, image_times["reference"], image_times["ours"]))
    paired_latency = statistics.median(map(operator.truediv, text_times["ours"], text_times["reference"]))
    print(
        f"\nimage throughput ours/reference: {throughput_ratio:.3f}x (target >= 1.0), paired {paired_throughput:.3f}x"
    )
    print(f"text latency ours/reference:     {latency_ratio:.3f}x (target <= 0.5), paired {paired_latency:.3f}x")
    onnx_ratio = {
        p: statistics.median(map(operator.truediv, image_times["ours"], image_times[f"onnx {p}"]))
        for p in ("fp32", "int8")
    }
    print(
        "image throughput ONNX Runtime/torch (ours), paired: "
        f"fp32 {onnx_ratio['fp32']:.3f}x, int8 {onnx_ratio['int8']:.3f}x"
    )
    summary = {
        "arch": args.arch,
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "images_per_s": {k: round(v, 3) for k, v in throughput.items()},
        "text_latency_ms": {k: round(v, 3) for k, v in latency_ms.items()},
        "throughput_ratio": round(throughput_ratio, 4),
        "latency_ratio": round(latency_ratio, 4),
        "paired_throughput_ratio": round(paired_throughput, 4),
        "paired_latency_ratio": round(paired_latency, 4),
        "max_abs_diff": {"image": float(image_diff), "text": float(text_diff)},
        "paired_onnx_over_torch": {k: round(v, 4) for k, v in onnx_ratio.items()},
        "cpu": cpu_description(),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
