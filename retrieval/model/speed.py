"""Image-encoding speed of an architecture on this machine, measured with random weights of its real size.

Speed depends on the architecture, not on the weights' values, so no download is needed to compare models. It is
measured in the runtime `clipsearch index` encodes with on a CPU: ONNX Runtime fp32, from an export made first.
"""

from __future__ import annotations

import functools
import statistics
import time

import torch

from retrieval.model.config import CLIPConfig
from retrieval.model.family import build_towers

REFERENCE = "ViT-B/32"  # speeds are reported relative to this preset, measured in the same run
RUNTIMES = ("onnx", "torch")


def image_encode_rate(config: CLIPConfig, batch: int = 8, repeats: int = 3, runtime: str = "onnx") -> float:
    """Images per second through the image tower in float32.

    One untimed warm-up batch, then the median of `repeats` timed batches of `batch` random images.

    Args:
        config: the architecture.
        batch: images per batch.
        repeats: timed batches.
        runtime: "onnx" (the tower exported into `$CLIPSEARCH_EXPORTS` or the cache, as `index` runs it on a CPU)
            or "torch" (this process's torch threads).
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    torch.manual_seed(0)
    model = build_towers(config, towers="image").eval()
    size = config.vision.image_size
    pixels = torch.randn(batch, 3, size, size)
    if runtime == "onnx":
        from retrieval.model.identity import ModelInfo
        from retrieval.model.onnx_export import ensure_export
        from retrieval.model.onnx_runtime import OnnxEncoder

        model.info = ModelInfo.for_model(model, "random weights")
        encoder = OnnxEncoder.open(ensure_export(model, "float32", "image"), towers="image")
        encode = functools.partial(encoder.encode_images, pixels.numpy())
    else:
        encode = functools.partial(model.encode_image, pixels)
    times = []
    with torch.inference_mode():
        encode()
        for _ in range(repeats):
            start = time.perf_counter()
            encode()
            times.append(time.perf_counter() - start)
    return batch / statistics.median(times)
