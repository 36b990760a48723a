#!/usr/bin/env bash
# The full-schedule Fashion-MNIST sweep. Every variant x every seed, two runs at a
# time with one torch thread each (the 2-core machine), then `fracfx report RUNS_DIR` writes
# RUNS_DIR/results.csv (one row per run), summary.csv / summary.md (mean +- std over seeds) and
# report.png (seeds shaded).
#
# Design (sized in the README, "Experiment: Fashion-MNIST, full schedule"): ARCH (default
# cifar_resnet8) on all SUBSET (default 60000) training images at 28x28, EPOCHS (default 4) at
# batch 128 (469 iterations per epoch: 1876 iterations, window 62), SGD LR 0.1 with x0.1 at 50 % and 75 %
# of the run (the trainer's default milestones), evaluated 10 times per run on the full 10,000
# test images (TEST_SUBSET overrides) with a checkpoint at each evaluation.
# The documented rule for the plateau indicator (PFQ, FracTrain), the same for every seed and
# variant: window = iterations / 30 (rounded down, at least 1), eps = 0.15, decay = 0.4 after the
# first and second turning point, N = 3 (FracTrain's CIFAR settings; docs/method.md sections 2, 9).
#
# Variants (args_of in run_once.sh): fp32, static8 (8/8/8), pfq (FW 3,4,6,8 / BW 6,6,8,8), dfq
# (w 4, cp set-point 3), fractrain (w 4, set-point 1.5 + 0.5 per turning point: the paper's rule,
# beta 1e-3), fractrain_gain (the same with --error-gain GAIN, default 20: the cost term's sign
# scaled by 1 + 20 |cp - set-point|) and fractrain_raise (--raise-gain GAIN: scaled only below
# the set-point, so the gates follow a raised set-point; runtime/dfq.py says why the first does not).
#
# Usage: bash scripts/sweep_fashion_mnist.sh [RUNS_DIR] [VARIANT ...]
#        (default runs/fmnist_sweep, all seven variants; seeds SEEDS="0 1 2"; JOBS=2 runs at a time)
# Runs land in RUNS_DIR/VARIANT/seedN (log: RUNS_DIR/VARIANT/seedN.log). Start the script again
# after a stop: finished runs (summary.json) are skipped, killed ones resume from their checkpoint.
# Smoke test: SUBSET=512 EPOCHS=1 TEST_SUBSET=256 SEEDS="0 1" bash scripts/sweep_fashion_mnist.sh /tmp/smoke
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/run_once.sh"
out=${1:-runs/fmnist_sweep}; shift || true
variants=("$@"); [ ${#variants[@]} -gt 0 ] || variants=(static8 fractrain fractrain_gain pfq dfq fp32 fractrain_raise)
arch=${ARCH:-cifar_resnet8}
subset=${SUBSET:-60000}
epochs=${EPOCHS:-4}
seeds=(${SEEDS:-0 1 2})
jobs=${JOBS:-2}
iters=$(( epochs * ((subset + 127) / 128) ))
window=$(( iters / 30 )); [ "$window" -ge 1 ] || window=1
common=(--arch "$arch" --dataset fashion-mnist --iters "$iters" --batch-size 128 --train-subset "$subset"
        --threads "${THREADS:-1}" --no-progress --log-every 50)
[ -n "${TEST_SUBSET:-}" ] && common+=(--test-subset "$TEST_SUBSET")
plateau=(--window "$window" --initial-threshold 0.15 --decay 0.4 --num-turning-point 3)
echo "sweep: $arch, $subset images, $iters iterations ($epochs epochs), window $window, seeds ${seeds[*]}, $jobs at a time -> $out"
run_sweep "$out" "$jobs"
