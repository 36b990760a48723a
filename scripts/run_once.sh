# Sourced by the experiment and sweep scripts. run_once FOLDER TRAIN_ARGS...: `fracfx train TRAIN_ARGS`
# into FOLDER; a finished run (summary.json) is skipped, a killed one (checkpoint.pt) resumed.
run_once() {
    local folder=$1; shift
    if [ -f "$folder/summary.json" ]; then echo "$(basename "$folder"): done already ($folder)"; return 0; fi
    local resume=()
    [ -f "$folder/checkpoint.pt" ] && resume=(--resume "$folder")
    echo "== $(basename "$folder") -> $folder"
    fracfx train "$@" --save-folder "$folder" "${resume[@]}"
}

# args_of VARIANT: the method arguments of a sweep variant (the same in every sweep), using the
# caller's `plateau` array (the indicator rule) and GAIN (default 20) for the tracking variants:
# fractrain_gain scales the cost term by 1 + GAIN |cp - set-point| on both sides, fractrain_raise
# only below the set-point (runtime/dfq.py explains why the first saturates).
args_of() {
    case $1 in
        fp32)            echo --method fp32 ;;
        static8)         echo --method static --act-bits 8 --weight-bits 8 --grad-bits 8 ;;
        pfq)             echo --method pfq --num-bits-schedule 3 4 6 8 --num-grad-bits-schedule 6 6 8 8 "${plateau[@]}" ;;
        dfq)             echo --method dfq --weight-bits 4 --target-ratio 3 ;;
        fractrain)       echo --method fractrain --weight-bits 4 --target-ratio 1.5 --target-ratio-step 0.5 "${plateau[@]}" ;;
        fractrain_gain)  echo --method fractrain --weight-bits 4 --target-ratio 1.5 --target-ratio-step 0.5 --error-gain "${GAIN:-20}" "${plateau[@]}" ;;
        fractrain_raise) echo --method fractrain --weight-bits 4 --target-ratio 1.5 --target-ratio-step 0.5 --raise-gain "${GAIN:-20}" "${plateau[@]}" ;;
        *) echo "unknown variant $1 (fp32 static8 pfq dfq fractrain fractrain_gain fractrain_raise)" >&2; return 2 ;;
    esac
}

# run_sweep OUT PARALLEL: every seed of the array `seeds` x every variant of `variants`, as
# run_once OUT/VARIANT/seedN "${common[@]}" --seed N $(args_of VARIANT), PARALLEL runs at a time,
# each logged to OUT/VARIANT/seedN.log; then `fracfx report OUT`. Non-zero when a run failed
# (start the script again: finished runs are skipped, killed ones resume).
run_sweep() {
    local out=$1 parallel=$2 failed=0 seed variant
    for variant in "${variants[@]}"; do args_of "$variant" >/dev/null || return 2; done  # a typo stops nothing half-way
    mkdir -p "$out"
    for seed in "${seeds[@]}"; do
        for variant in "${variants[@]}"; do
            while [ "$(jobs -rp | wc -l)" -ge "$parallel" ]; do wait -n || failed=1; done
            mkdir -p "$out/$variant"
            # shellcheck disable=SC2046
            ( run_once "$out/$variant/seed$seed" "${common[@]}" --seed "$seed" $(args_of "$variant") \
                  > "$out/$variant/seed$seed.log" 2>&1 \
              && echo "$variant seed $seed: finished" || { echo "$variant seed $seed: FAILED (see $out/$variant/seed$seed.log)"; exit 1; } ) &
        done
    done
    while [ "$(jobs -rp | wc -l)" -gt 0 ]; do wait -n || failed=1; done
    fracfx report "$out"
    [ "$failed" -eq 0 ] || { echo "some runs failed; start the script again to resume them" >&2; return 1; }
}
