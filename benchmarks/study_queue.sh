#!/bin/bash
# The study's queue (compare.md), in the order its cells run: one shard per core, side by side,
#   bash benchmarks/study_queue.sh 0 & bash benchmarks/study_queue.sh 1 &
# Finished cells are committed under benchmarks/compare_cells/, so a rerun (or a fresh checkout) resumes where the
# last one stopped. The ViT and MobileNetV2 need their checkpoints first (benchmarks/train_cifar.md: the ViT's
# `--arch cifar_vit --epochs 10 --threads 1`).
cd "$(dirname "$0")/.." || exit 2
K=${1:?shard: 0 or 1}
run() { OMP_NUM_THREADS=1 .venv/bin/python benchmarks/compare.py --shard "$K/2" --extra-seeds "$@" \
          >> "runs/compare-q-$K.log" 2>&1; }
mkdir -p runs
run --models vit --methods easier random control egp layerfold
run --models resnet32 --methods easier control
run --models resnet32 vit --methods one-shot entropy-reg-0.1 gradient sparsity entropy-reg-0.5
run --models resnet32 --methods leaky_relu gelu silu
run --models resnet32 vit --methods random --seeds 2 3 4
