#!/bin/bash
# The study's queue (compare.md), in the order its cells run: one shard per core, side by side,
#   bash benchmarks/study_queue.sh 0 & bash benchmarks/study_queue.sh 1 &
# Finished cells are cached under runs/compare/, so a rerun resumes where the last one stopped.
cd "$(dirname "$0")/.." || exit 2
K=${1:?shard: 0 or 1}
run() { OMP_NUM_THREADS=1 .venv/bin/python benchmarks/compare.py --shard "$K/2" --extra-seeds "$@" \
          >> "runs/compare-q-$K.log" 2>&1; }
run --models mobilenet_v2 resnet20 --methods easier control layerfold random egp tlc one-shot entropy-reg-0.1 \
    gradient sparsity entropy-reg-0.5
run --models resnet32 --methods easier control layerfold random egp tlc
run --models mobilenet_v2 --methods leaky_relu gelu silu
run --models vit --methods easier control layerfold random egp
run --models resnet32 vit --methods one-shot entropy-reg-0.1 gradient sparsity entropy-reg-0.5
run --models resnet32 --methods leaky_relu gelu silu
run --models mobilenet_v2 resnet32 vit --methods random --seeds 2 3 4
