"""Encode speed on CPU: our CLIP in torch and in ONNX Runtime (fp32 and int8, the runtime `clipsearch index` uses
on a CPU) against openai/CLIP's reference `model.py`, or every model family against ViT-B/32 (`--families`), in
the same run.

Measures image embeddings per second at one batch size and the latency of embedding one short text query.
`encoder_images_per_s` is also what `index_speed.py` reports as encoder-only throughput, so the two agree.
The reference is the `clip/model.py` shipped in the `clip-anytorch` wheel, loaded by file path (it needs only
torch), so no `clip` package lands on the import path. With `--families`, each registry model's architecture
is built with random weights of its real size (speed does not depend on the weights' values, so nothing is
downloaded), exported to ONNX as `clipsearch index` exports it, and timed in ONNX Runtime fp32 (what `index`
and `query` run on a CPU) and in torch, against ViT-B/32 in the same rounds: the ONNX Runtime ratio is the one
that decides the default model (README, "Models"). Runs alternate between the models and the figures are
medians, because the CPU may be shared; the load average is printed beside them.

    python benchmarks/encode_speed.py
    python benchmarks/encode_speed.py --reference-model-py /path/to/clip/model.py --repeats 9
    python benchmarks/encode_speed.py --families --threads 2
    python benchmarks/encode_speed.py --families --text-runs 0 --batch-size 8 --repeats 7   # the README's table
    python benchmarks/encode_speed.py --families --models ViT-B/32 MobileCLIP2-S0 --exports /tmp/exports
    python benchmarks/encode_speed.py --batch-size 8 --reference-model-py clip/model.py
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import importlib.util
import json
import operator
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import nn

from retrieval.model.clip import CLIP
from retrieval.model.config import PRESETS, CLIPConfig
from retrieval.model.family import EmbeddingModel, build_towers
from retrieval.model.identity import ModelInfo
from retrieval.model.onnx_runtime import OnnxEncoder, available_cores
from retrieval.model.registry import available_models, get_spec, is_registered
from retrieval.model.tokenizer import tokenize

ARCH = "ViT-B/32"  # architecture preset; weights are random
BATCH_SIZE = 32  # images per encode_image call
REPEATS = 11  # timed image batches per model
TEXT_RUNS = 50  # timed single-query text encodings per model
WARMUP = 2  # untimed calls per model and task first
PROMPT = "a photo of a red bicycle"  # a 6-word query
SEED = 0
BASELINE = "ViT-B/32"  # --families: every model is compared with this one
RUNTIMES = ("onnx", "torch")  # --families: ONNX Runtime fp32 is what `clipsearch index` runs on a CPU
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
    cores = available_cores()
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

    Both are padded to the context length, as `encode_texts` hands them to either runtime; CLIP's torch tower
    then runs only up to the end-of-text token, its ONNX export all positions (the trace fixes the length).
    MobileCLIP2 has CLIP's tokenizer but runs all 77 positions. SigLIP's tokenizer.json is a download; its text
    tower always runs all positions, so random ids of the full context length cost the same as the real ones.
    """
    if config.family in ("clip", "mobileclip"):
        return torch.from_numpy(tokenize(prompt, context_length=config.text.context_length))  # [1, L]
    generator = torch.Generator().manual_seed(SEED)
    return torch.randint(0, config.text.vocab_size, (1, config.text.context_length), generator=generator)


def ort_version() -> str:
    """The installed onnxruntime's version."""
    return importlib.metadata.version("onnxruntime")


def onnx_tower(model: EmbeddingModel, name: str, tower: str, threads: int | None) -> OnnxEncoder:
    """One tower of a random-weights model, exported (into $CLIPSEARCH_EXPORTS) and opened as `index` opens it."""
    from retrieval.model.onnx_export import ensure_export

    model.info = ModelInfo.for_model(model, f"{name} random")
    return OnnxEncoder.open(ensure_export(model, "float32", tower), towers=tower, threads=threads)


def _ratios(times: dict[str, list[float]], key: str, baseline: str) -> tuple[float, float, float]:
    """Median and quartiles of a call's time over the baseline's in the same round (drifts in load cancel)."""
    ratios = [t / b for t, b in zip(times[key], times[baseline], strict=True)]
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    return statistics.median(ratios), q1, q3


def measure_families(
    configs: dict[str, CLIPConfig],
    baseline: str,
    batch_size: int = BATCH_SIZE,
    repeats: int = REPEATS,
    text_runs: int = TEXT_RUNS,
    warmup: int = WARMUP,
    threads: int | None = None,
    prompt: str = PROMPT,
) -> list[dict]:
    """Image throughput and one-query text latency of each architecture in ONNX Runtime (fp32, as `clipsearch
    index` and `query` run on a CPU) and in torch, against `baseline` in the same rounds.

    Every call of every model and runtime runs once per round, the order reversed every other round; a figure
    is the median over rounds, a ratio the median of the per-round ratios to the baseline in the same runtime,
    with its quartiles (their spread is the noise to compare a margin with).

    Returns:
        One dict per model, in the order of `configs`.
    """
    image_calls, text_calls, text_of = {}, {}, {}
    for name, config in configs.items():
        torch.manual_seed(SEED)  # the same weights whatever the other models, so --exports is reused across runs
        tower = build_towers(config, towers="image").eval()
        size = config.vision.image_size
        pixels = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(SEED))
        onnx = onnx_tower(tower, name, "image", threads)
        image_calls[f"{name} onnx"] = functools.partial(onnx.encode_images, pixels.numpy())
        image_calls[f"{name} torch"] = functools.partial(tower.encode_image, pixels)
        # Models with the same text tower (architecture and activation) share one timing.
        text_key = f"{config.family} {config.text} {config.quick_gelu}"
        if text_runs and f"{text_key} onnx" not in text_calls:
            tower = build_towers(config, towers="text").eval()
            tokens = family_tokens(config, prompt)
            onnx = onnx_tower(tower, name, "text", threads)
            text_calls[f"{text_key} onnx"] = functools.partial(onnx.encode_texts, tokens.numpy())
            text_calls[f"{text_key} torch"] = functools.partial(tower.encode_text, tokens)
        text_of[name] = text_key
    image_times = time_interleaved(image_calls, repeats, warmup)
    text_times = time_interleaved(text_calls, text_runs, warmup) if text_runs else {}
    rows = []
    for name, config in configs.items():
        row = {"model": name, "arch": get_spec(name).arch if is_registered(name) else name, "family": config.family}
        for runtime in RUNTIMES:
            image, text = f"{name} {runtime}", f"{text_of[name]} {runtime}"
            image_ratio = _ratios(image_times, image, f"{baseline} {runtime}")
            row[runtime] = {
                "images_per_s": round(batch_size / statistics.median(image_times[image]), 3),
                "image_time_vs_baseline": round(image_ratio[0], 4),
                "image_time_vs_baseline_iqr": [round(image_ratio[1], 4), round(image_ratio[2], 4)],
                "text_latency_ms": None,
                "text_latency_vs_baseline": None,
            }
            if text_times:
                row[runtime]["text_latency_ms"] = round(1000 * statistics.median(text_times[text]), 3)
                row[runtime]["text_latency_vs_baseline"] = round(
                    _ratios(text_times, text, f"{text_of[baseline]} {runtime}")[0], 4
                )
        rows.append(row)
    return rows


def _ms(value: float | None) -> str:
    """A latency cell; "-" when text was not timed (--text-runs 0)."""
    return "-" if value is None else f"{value:.2f}"


def run_families(args: argparse.Namespace) -> None:
    """Print each model's image throughput and text latency next to ViT-B/32's, measured in one run."""
    names = [BASELINE] + [n for n in args.models if n != BASELINE]
    configs = {}
    for name in names:
        arch = get_spec(name).arch
        if arch not in PRESETS:
            raise SystemExit(f"{name} has no architecture preset to build; choose from {', '.join(available_models())}")
        configs[name] = PRESETS[arch]
    threads = args.threads or available_cores()
    torch.set_num_threads(threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="encode-speed-") as scratch:
        # Exports of random weights are of no use later: they go to --exports, else a folder deleted afterwards.
        os.environ["CLIPSEARCH_EXPORTS"] = str(args.exports or scratch)
        rows = measure_families(
            configs, BASELINE, args.batch_size, args.repeats, args.text_runs, args.warmup, threads, args.prompt
        )
    load = (load_before[0], os.getloadavg()[0])
    print(f"random weights, fp32, {threads} threads, torch {torch.__version__}, onnxruntime {ort_version()}")
    print(f"{cpu_description()}; load average {load[0]:.2f} before, {load[1]:.2f} after")
    print(
        f"\n{'':<34} {'image time per image vs ' + BASELINE + ' (IQR)':^45} {'images/s b' + str(args.batch_size):^17}"
        f" {'text ms (1 query)':^17}"
    )
    print(f"{'model':<34} {'ONNX Runtime':^22} {'torch':^22} {'ORT':>8} {'torch':>8} {'ORT':>8} {'torch':>8}")
    for row in rows:
        onnx, eager = row["onnx"], row["torch"]
        cells = [
            f"{r['image_time_vs_baseline']:.2f}x ({r['image_time_vs_baseline_iqr'][0]:.2f}-"
            f"{r['image_time_vs_baseline_iqr'][1]:.2f})"
            for r in (onnx, eager)
        ]
        print(
            f"{row['model']:<34} {cells[0]:^22} {cells[1]:^22} {onnx['images_per_s']:>8.2f} "
            f"{eager['images_per_s']:>8.2f} {_ms(onnx['text_latency_ms']):>8} {_ms(eager['text_latency_ms']):>8}"
        )
    summary = {
        "baseline": BASELINE,
        "threads": threads,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "load_average": [round(x, 2) for x in load],
        "cpu": cpu_description(),
        "models": rows,
    }
    print(json.dumps(summary))


def main() -> None:
    """Run the benchmark and print a table, the ratios and one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default=ARCH, choices=sorted(PRESETS), help="architecture preset (random weights)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="images per encode call")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="timed image batches per model")
    parser.add_argument(
        "--text-runs", type=int, default=TEXT_RUNS, help="timed single-query text encodings (--families: 0 skips text)"
    )
    parser.add_argument("--warmup", type=int, default=WARMUP, help="untimed calls first")
    parser.add_argument("--prompt", default=PROMPT, help="the text query")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default: torch's choice; --families: one per core, for ONNX Runtime too)",
    )
    parser.add_argument("--reference-model-py", type=Path, default=None, help="path to openai/CLIP's clip/model.py")
    parser.add_argument("--families", action="store_true", help="compare model families with ViT-B/32 instead")
    parser.add_argument("--models", nargs="+", default=list(FAMILY_MODELS), help="--families: registry names")
    parser.add_argument(
        "--exports", type=Path, default=None, help="--families: keep the ONNX exports here (default: a temp folder)"
    )
    args = parser.parse_args()
    if args.families:
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
