"""Image-encoding speed of an architecture on this machine, measured with random weights of its real size.

Speed depends on the architecture, not on the weights' values, so no download is needed to compare models.
"""

from __future__ import annotations

import statistics
import time

import torch

from retrieval.model.config import CLIPConfig
from retrieval.model.family import build_towers

REFERENCE = "ViT-B/32"  # speeds are reported relative to this preset, measured in the same run


def image_encode_rate(config: CLIPConfig, batch: int = 8, repeats: int = 3) -> float:
    """Images per second through the image tower (float32, this process's torch threads).

    One untimed warm-up batch, then the median of `repeats` timed batches of `batch` random images.
    """
    torch.manual_seed(0)
    model = build_towers(config, towers="image").eval()
    size = config.vision.image_size
    pixels = torch.randn(batch, 3, size, size)
    times = []
    with torch.inference_mode():
        model.encode_image(pixels)
        for _ in range(repeats):
            start = time.perf_counter()
            model.encode_image(pixels)
            times.append(time.perf_counter() - start)
    return batch / statistics.median(times)
