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
