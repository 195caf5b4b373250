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

# finetune N DATA EPOCHS LR: stage N fine-tunes stage N-1 on DATA, at batch 256.
finetune() {
    clipsearch train "$2" --from "$runs/stage$(($1 - 1))" --epochs "$3" --batch-size 256 --lr "$4" --log-every 25 \
        --checkpoint-every 100 "${common[@]}" --out "$runs/stage$1"
}
finetune 2 shapes:40000:3 4 5e-4
finetune 3 shapes:40000:4 1 2e-4
finetune 4 shapes:80000:5 1 2e-4
finetune 5 shapes:120000:6 1 2e-4
finetune 6 shapes:120000:7 1 2e-4
finetune 7 shapes:120000:8 1 2e-4
finetune 8 shapes:96000:9:shape-groups=8 1 2e-4
finetune 9 shapes:160000:10:shape-groups=8 1 2e-4
finetune 10 shapes:160000:11:shape-groups=8 1 2e-4
finetune 11 shapes:120000:12 1 1e-4
finetune 12 shapes:128000:13:mixed-groups=8 1 1e-4
finetune 13 shapes:64000:14:colour-groups=8 1 5e-5
echo "done: $runs/stage13 holds config.json and model.safetensors"
