#!/usr/bin/env bash
# The KJV language-model sweep. transformer_lm (d_model 128, 2 layers, 4 heads,
# context 64, tied head quantized too: --keep-fp32 with no value) on the King James Bible,
# character level, ITERS (default 3000) iterations at batch 32 (96,000 windows, about 1.4 epochs of
# the 4.3M-character training split), Adam LR 1e-3 with x0.1 at 50 % and 75 % of the run, evaluated
# 10 times on the first 1024 validation windows, a checkpoint at each evaluation; one torch thread
# per run, JOBS (default 2) runs at a time, seeds SEEDS (default "0 1 2").
# The indicator rule (PFQ, FracTrain), the same for every seed and variant: window = iterations /
# 30 (100 here), eps 0.15, decay 0.4, N = 3 (as scripts/sweep_fashion_mnist.sh).
# Variants (args_of in run_once.sh): static8, pfq (FW 3,4,6,8 / BW 6,6,8,8), fractrain (w 4,
# candidates 3:6,4:6,4:8,6:8,6:12, set-point 1.5 + 0.5 per turning point, the paper's
# controller), fractrain_raise (the same with --raise-gain GAIN, default 20); fractrain_gain
# (--error-gain GAIN) and fp32 are not in the default list: name them to add them, e.g.
# `bash scripts/sweep_kjv.sh runs/kjv_sweep fractrain_gain` (the README's table has it).
# Sizing, measured: 3000-iteration runs took 7-14 minutes each, two at a time, so the 12 default
# runs take about 45-85 minutes.
# Usage: bash scripts/sweep_kjv.sh [RUNS_DIR] [VARIANT ...]   (default runs/kjv_sweep)
# Runs land in RUNS_DIR/VARIANT/seedN; starting the script again skips finished runs and resumes
# killed ones; at the end `fracfx report RUNS_DIR` writes results.csv, summary.csv/.md, report.png.
# Smoke test: ITERS=30 TEST_SUBSET=64 SEEDS="0" bash scripts/sweep_kjv.sh /tmp/kjv_smoke
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/run_once.sh"
out=${1:-runs/kjv_sweep}; shift || true
variants=("$@"); [ ${#variants[@]} -gt 0 ] || variants=(static8 fractrain fractrain_raise pfq)
iters=${ITERS:-3000}
seeds=(${SEEDS:-0 1 2})
jobs=${JOBS:-2}
window=$(( iters / 30 )); [ "$window" -ge 1 ] || window=1
common=(--arch transformer_lm --dataset kjv --context 64 --d-model 128 --n-layers 2 --n-heads 4
        --batch-size 32 --iters "$iters" --optimizer adam --lr 1e-3 --keep-fp32
        --test-subset "${TEST_SUBSET:-1024}" --threads "${THREADS:-1}" --no-progress --log-every 100)
plateau=(--window "$window" --initial-threshold 0.15 --decay 0.4 --num-turning-point 3)
echo "sweep: transformer_lm on KJV, $iters iterations, window $window, seeds ${seeds[*]}, $jobs at a time -> $out"
run_sweep "$out" "$jobs"
