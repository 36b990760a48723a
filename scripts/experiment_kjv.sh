#!/usr/bin/env bash
# The real-data language-model experiment: transformer_lm (d_model 128, 2 layers,
# 4 heads, context 64, tied head) on the King James Bible, character level (Debian package
# bible-kjv), ITERS (default 480) iterations at batch 32, Adam LR 1e-3 with x0.1 at 50 % and
# 75 % of the run (after 150 iterations SGD at LR 0.1 had validation perplexity 21.8, Adam at
# 1e-3 10.9; SGD at LR 0.5 diverged),
# seed 0, evaluated every ITERS/5 iterations on the first 1024 validation windows (65,536
# characters). Every linear and attention matmul is quantized, the tied head included
# (--keep-fp32 with no value): with the head in FP32 its fixed cost alone (~26 % of static
# 8-bit training at this width) would cap any saving. Indicator window WINDOW (default 16,
# about iterations / 30, docs/method.md section 9), CIFAR eps 0.15, decay 0.4. One torch thread
# per run; each took 1.5-4 minutes on the 2 cores while two other trainings ran.
# Usage: bash scripts/experiment_kjv.sh [RUNS_DIR] [METHOD ...]
# (default runs/kjv; methods static8 fractrain pfq fp32, or dfq), then:
# fracfx report RUNS_DIR/{static8,fractrain,pfq,fp32} -o RUNS_DIR/report.png
# FracTrain's set-point schedule and gate candidates: TARGET (1.5), STEP (0.5), CANDIDATES
# (3:6,4:6,4:8,6:8,6:12), and SEED (0); give a variation its own RUNS_DIR.
# A killed run continues from its checkpoint when the script is started again.
set -euo pipefail
source "$(dirname "$0")/run_once.sh"
out=${1:-runs/kjv}; shift || true
methods=("$@"); [ ${#methods[@]} -gt 0 ] || methods=(static8 fractrain pfq fp32)
iters=${ITERS:-480}
common=(--arch transformer_lm --dataset kjv --context 64 --d-model 128 --n-layers 2 --n-heads 4
        --batch-size 32 --iters "$iters" --optimizer adam --lr 1e-3 --keep-fp32
        --test-subset 1024 --eval-every $(( iters / 5 )) --seed "${SEED:-0}" --threads "${THREADS:-1}"
        --no-progress --log-every 40)
plateau=(--window "${WINDOW:-16}" --initial-threshold 0.15 --decay 0.4 --num-turning-point 3)
for method in "${methods[@]}"; do
    case $method in
        fp32)      args=(--method fp32) ;;
        static8)   args=(--method static --act-bits 8 --weight-bits 8 --grad-bits 8) ;;
        pfq)       args=(--method pfq --num-bits-schedule 3 4 6 8 --num-grad-bits-schedule 6 6 8 8 "${plateau[@]}") ;;
        dfq)       args=(--method dfq --weight-bits 4 --target-ratio 2.5) ;;
        fractrain) args=(--method fractrain --weight-bits 4 --target-ratio "${TARGET:-1.5}" --target-ratio-step "${STEP:-0.5}"
                         --candidates "${CANDIDATES:-3:6,4:6,4:8,6:8,6:12}" "${plateau[@]}") ;;
        *) echo "unknown method $method (fp32 static8 pfq dfq fractrain)" >&2; exit 2 ;;
    esac
    run_once "$out/$method" "${common[@]}" "${args[@]}"
done
