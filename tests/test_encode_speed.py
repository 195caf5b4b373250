"""benchmarks/encode_speed.py --families on tiny architectures: both runtimes, ratios against the baseline."""

from __future__ import annotations

from benchmarks.encode_speed import measure_families
from retrieval.model.config import PRESETS


def test_families_are_timed_in_onnx_runtime_and_torch_against_the_baseline():
    configs = {"tiny-vit": PRESETS["tiny-vit"], "tiny-rn": PRESETS["tiny-rn"]}
    rows = measure_families(configs, "tiny-vit", batch_size=2, repeats=3, text_runs=3, warmup=1, threads=1)
    assert [row["model"] for row in rows] == ["tiny-vit", "tiny-rn"]
    for row in rows:
        for runtime in ("onnx", "torch"):
            figures = row[runtime]
            assert figures["images_per_s"] > 0 and figures["text_latency_ms"] > 0
            low, high = figures["image_time_vs_baseline_iqr"]
            assert low <= figures["image_time_vs_baseline"] <= high
    baseline = rows[0]
    assert all(
        baseline[r]["image_time_vs_baseline"] == 1.0 == baseline[r]["text_latency_vs_baseline"]
        for r in ("onnx", "torch")
    )
    # The same text tower is timed once and shared, so its ratio is exactly 1.
    assert rows[1]["onnx"]["text_latency_vs_baseline"] == 1.0


def test_text_runs_zero_times_images_only():
    rows = measure_families({"tiny-vit": PRESETS["tiny-vit"]}, "tiny-vit", batch_size=2, repeats=2, text_runs=0)
    assert rows[0]["onnx"]["text_latency_ms"] is None and rows[0]["onnx"]["images_per_s"] > 0
