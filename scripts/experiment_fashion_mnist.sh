#!/usr/bin/env bash
# The real-data image experiment: cifar_resnet38 on Fashion-MNIST, 3 epochs at
# batch 128, seed 0, LR 0.1 with x0.1 at 50 % and 75 % of the run, evaluated on the full 10k
# test set once per epoch. SUBSET (default 15000) training images: the full 60k x 3 epochs x 5
# methods is over 3 hours on 2 cores; SUBSET=60000 runs the full set (1407 iterations; use
# WINDOW=47). Indicator window WINDOW (default 12, about iterations / 30, docs/method.md section 9),
# CIFAR eps 0.15, decay 0.4. THREADS (default: torch's choice) torch threads per run.
# Usage: bash scripts/experiment_fashion_mnist.sh [RUNS_DIR] [METHOD ...]
# (default runs/fmnist, all five methods), then: fracfx report RUNS_DIR/* -o RUNS_DIR/report.png
# A killed run continues from its checkpoint when the script is started again.
set -euo pipefail
source "$(dirname "$0")/run_once.sh"
out=${1:-runs/fmnist}; shift || true
methods=("$@"); [ ${#methods[@]} -gt 0 ] || methods=(static8 fractrain pfq dfq fp32)
subset=${SUBSET:-15000}
per_epoch=$(( (subset + 127) / 128 ))
common=(--arch cifar_resnet38 --dataset fashion-mnist --epochs 3 --batch-size 128 --seed 0
        --train-subset "$subset" --eval-every "$per_epoch" --no-progress --log-every 25)
[ -n "${THREADS:-}" ] && common+=(--threads "$THREADS")
plateau=(--window "${WINDOW:-12}" --initial-threshold 0.15 --decay 0.4 --num-turning-point 3)
for method in "${methods[@]}"; do
    case $method in
        fp32)      args=(--method fp32) ;;
        static8)   args=(--method static --act-bits 8 --weight-bits 8 --grad-bits 8) ;;
        pfq)       args=(--method pfq --num-bits-schedule 3 4 6 8 --num-grad-bits-schedule 6 6 8 8 "${plateau[@]}") ;;
        dfq)       args=(--method dfq --weight-bits 4 --target-ratio 3) ;;
        fractrain) args=(--method fractrain --weight-bits 4 --target-ratio 1.5 --target-ratio-step 0.5 "${plateau[@]}") ;;
        *) echo "unknown method $method (fp32 static8 pfq dfq fractrain)" >&2; exit 2 ;;
    esac
    run_once "$out/$method" "${common[@]}" "${args[@]}"
done
