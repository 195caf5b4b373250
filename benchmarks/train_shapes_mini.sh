#!/usr/bin/env bash
# Reproduces the bundled shapes-mini model: one from-scratch run, then fine-tuning runs on fresh generated
# scenes at a lower learning rate (shape is what the model learns last, in the low-learning-rate phases); from
# stage 8 on, some stages train on groups of scenes that differ only in shape or colour, kept in one batch, which
# teach it shape fastest (see the model card). One thread keeps every run deterministic on a given machine and
# library versions; ~100 min on one CPU core.
#
#   bash benchmarks/train_shapes_mini.sh [RUNS_DIR]        # default runs/shapes-mini
#
# The last stage's config.json and model.safetensors are what retrieval/model/assets/shapes-mini/ holds.
set -euo pipefail
runs=${1:-runs/shapes-mini}
common=(--val shapes:500:2 --weight-decay 0.2 --seed 0 --threads 1
        --save-dtype float16 --name shapes-mini
        --description "tiny CLIP trained on generated shapes only (demo and test model)")

clipsearch train shapes:60000:1 --model shapes-mini --epochs 5 --batch-size 128 --lr 1e-3 --log-every 50 --checkpoint-every 200 "${common[@]}" \
    --out "$runs/stage1"
clipsearch train shapes:40000:3 --from "$runs/stage1" --epochs 4 --batch-size 256 --lr 5e-4 --log-every 25 --checkpoint-every 100 "${common[@]}" \
    --out "$runs/stage2"
clipsearch train shapes:40000:4 --from "$runs/stage2" --epochs 1 --batch-size 256 --lr 2e-4 --log-every 25 --checkpoint-every 100 "${common[@]}" \
    --out "$runs/stage3"
clipsearch train shapes:80000:5 --from "$runs/stage3" --epochs 1 --batch-size 256 --lr 2e-4 --log-every 25 --checkpoint-every 100 "${common[@]}" \
    --out "$runs/stage4"
clipsearch train shapes:120000:6 --from "$runs/stage4" --epochs 1 --batch-size 256 --lr 2e-4 --log-every 25 --checkpoint-every 100 "${common[@]}" \
    --out "$runs/stage5"
clipsearch train shapes:120000:7 --from "$runs/stage5" --epochs 1 --batch-size 256 --lr 2e-4 --log-every 25 --checkpoint-every 100 "${common[@]}" \
    --out "$runs/stage6"
clipsearch train shapes:120000:8 --from "$runs/stage6" --epochs 1 --batch-size 256 --lr 2e-4 --log-every 25 --checkpoint-every 100 "${common[@]}" \
    --out "$runs/stage7"
clipsearch train shapes:96000:9:shape-groups=8 --from "$runs/stage7" --epochs 1 --batch-size 256 --lr 2e-4 --log-every 25 --checkpoint-every 100 "${common[@]}" \
    --out "$runs/stage8"
clipsearch train shapes:160000:10:shape-groups=8 --from "$runs/stage8" --epochs 1 --batch-size 256 --lr 2e-4 --log-every 25 --checkpoint-every 100 "${common[@]}" \
    --out "$runs/stage9"
clipsearch train shapes:160000:11:shape-groups=8 --from "$runs/stage9" --epochs 1 --batch-size 256 --lr 2e-4 --log-every 25 --checkpoint-every 100 "${common[@]}" \
    --out "$runs/stage10"
clipsearch train shapes:120000:12 --from "$runs/stage10" --epochs 1 --batch-size 256 --lr 1e-4 --log-every 25 --checkpoint-every 100 "${common[@]}" \
    --out "$runs/stage11"
clipsearch train shapes:128000:13:mixed-groups=8 --from "$runs/stage11" --epochs 1 --batch-size 256 --lr 1e-4 --log-every 25 --checkpoint-every 100 "${common[@]}" \
    --out "$runs/stage12"
clipsearch train shapes:64000:14:colour-groups=8 --from "$runs/stage12" --epochs 1 --batch-size 256 --lr 5e-5 --log-every 25 --checkpoint-every 100 "${common[@]}" \
    --out "$runs/stage13"
echo "done: $runs/stage13 holds config.json and model.safetensors"
