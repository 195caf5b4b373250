"""One unattended check of the CUDA path, for a machine with a GPU (it has not run on one yet: none was available
where clipsearch is developed). Takes under 10 minutes with the defaults.

1. Generates photo-sized JPEGs (4000x3000 with EXIF) and a ViT-B/32 with random weights (`benchmarks/index_speed`).
2. Indexes them on the CPU in fp32: the reference vectors.
3. Indexes them with the local engine on the GPU (fp16 autocast, pinned-memory copies: `retrieval.model.encode`).
4. Indexes them with the Ray engine on a Ray cluster started here, one encoder actor per GPU (`num_gpus=1` each).
5. Checks every GPU vector against the CPU one (cosine >= 0.999), and, with faiss-gpu installed, the top-10 of a
   GPU flat index against the CPU index's for 100 queries.
6. Prints images/s per engine and the seconds per stage: decode (read + decode + transform, summed over the decoder
   processes or tasks), transfer (host to GPU, measured on pinned batches of the same shape), encode, write.

On a machine without a CUDA GPU it says so and exits 0. Exit status 1 when a check fails.

    python -m benchmarks.gpu_check [--photos 256]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

# ---- knobs ----------------------------------------------------------------------------------------------
PHOTOS = 256  # photo-sized JPEGs: 8 batches of 32
BATCH = 32
ARCH = "ViT-B/32"
MIN_COSINE = 0.999  # fp16 autocast against fp32
MIN_TOP10_OVERLAP = 0.99  # faiss-gpu flat search against faiss-cpu flat search (ties may swap at the margin)
QUERIES = 100


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=PHOTOS, help=f"photo-sized JPEGs [{PHOTOS}]")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print(f"No CUDA GPU on this machine (torch {torch.__version__}, CUDA available: no): nothing to check here. "
              "Run this script on a machine with a CUDA GPU and a CUDA build of torch.")  # fmt: skip
        return 0

    from benchmarks.index_speed import CACHE, checkpoint, photos_folder
    from indexer.options import IndexOptions
    from indexer.pipeline import index_folders
    from indexer.ray_engine import RayOptions, index_with_ray
    from retrieval.model.loading import load_model
    from retrieval.store import Store

    CACHE.mkdir(parents=True, exist_ok=True)
    folder = photos_folder(CACHE, args.photos)
    model_path = checkpoint(CACHE, ARCH, "vit-b-32-random")
    options = IndexOptions(batch_size=BATCH, progress=False)
    gpus = torch.cuda.device_count()
    print(f"{gpus} GPU(s): {torch.cuda.get_device_name(0)}; {args.photos} photos of 4000x3000", flush=True)
    results, vectors = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, device in (("cpu_fp32", "cpu"), ("local_gpu", "cuda")):
            model, preprocess = load_model(model_path, device=device, towers="image")
            store = Store.open(Path(tmp) / name, model.info, create=True)
            summary = index_folders([folder], model, preprocess, store, options)
            results[name], vectors[name] = summary, _vectors(store)
        import ray

        ray.init(num_gpus=gpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        try:
            model, preprocess = load_model(model_path, device="cpu", towers="image")
            store = Store.open(Path(tmp) / "ray_gpu", model.info, create=True)
            ray_options = RayOptions(actors=gpus, model_source=str(model_path))
            results["ray_gpu"] = index_with_ray([folder], model, preprocess, store, options, ray_options)
            vectors["ray_gpu"] = _vectors(store)
        finally:
            ray.shutdown()
        transfer = _transfer_seconds(args.photos, model.info.image_size)

    ok = True
    report = {"gpus": gpus, "device": torch.cuda.get_device_name(0), "photos": args.photos, "engines": {}}
    for name, summary in results.items():
        stages = summary.stage_seconds
        cosine = _min_cosine(vectors[name], vectors["cpu_fp32"]) if name != "cpu_fp32" else 1.0
        ok &= cosine >= MIN_COSINE and summary.indexed == args.photos
        report["engines"][name] = {
            "images_per_s": round(summary.indexed / summary.seconds, 2),
            "decode_s": round(stages["read"] + stages["decode"] + stages["transform"], 3),
            "transfer_s": round(transfer, 3) if name != "cpu_fp32" else 0.0,
            "encode_s": stages["encode"],
            "write_s": stages["write"],
            "min_cosine_vs_cpu_fp32": round(cosine, 6),
        }
        print(f"{name:10s} {report['engines'][name]}", flush=True)
    overlap = _faiss_gpu_overlap(vectors["cpu_fp32"])
    report["faiss_gpu_top10_overlap"] = overlap
    if overlap is None:
        print("faiss-gpu not installed: the GPU index was not checked (pip install 'clipsearch[gpu]')")
    else:
        ok &= overlap >= MIN_TOP10_OVERLAP
        print(f"faiss-gpu flat top-10 overlap with faiss-cpu: {overlap:.4f} (>= {MIN_TOP10_OVERLAP})")
    report["ok"] = bool(ok)
    print(json.dumps(report))
    print("GPU check passed" if ok else f"GPU check FAILED (cosine >= {MIN_COSINE}, every photo indexed)")
    return 0 if ok else 1


def _vectors(store) -> dict:
    """path -> vector of every stored row."""
    ids, vectors = store.all_vectors()
    paths = [r["path"] for r in store.rows(ids, columns=["path"])]
    return dict(zip(paths, vectors, strict=True))


def _min_cosine(ours: dict, reference: dict) -> float:
    """The lowest cosine between a path's vector and its reference vector (0 when a path is missing)."""
    if sorted(ours) != sorted(reference):
        return 0.0
    return min(float(ours[p] @ reference[p]) for p in reference)


def _transfer_seconds(photos: int, image_size: int) -> float:
    """Host-to-GPU seconds for `photos` preprocessed images in pinned batches of `BATCH`, as the encoder copies them."""
    import torch

    batch = torch.zeros(BATCH, 3, image_size, image_size).pin_memory()  # [B, 3, S, S]
    batch.to("cuda", non_blocking=True)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range((photos + BATCH - 1) // BATCH):
        batch.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def _faiss_gpu_overlap(vectors: dict) -> float | None:
    """Mean top-10 overlap of a faiss-gpu flat index with a faiss-cpu one, or None without faiss-gpu."""
    import faiss
    import numpy as np

    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() == 0:
        return None
    matrix = np.stack(list(vectors.values())).astype(np.float32)  # [N, D]
    queries = matrix[:QUERIES]
    cpu = faiss.IndexFlatIP(matrix.shape[1])
    cpu.add(matrix)
    gpu = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, faiss.IndexFlatIP(matrix.shape[1]))
    gpu.add(matrix)
    _, expected = cpu.search(queries, 10)
    _, found = gpu.search(queries, 10)
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(expected, found, strict=True)]))


if __name__ == "__main__":
    sys.exit(main())
