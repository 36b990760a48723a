# Sourced by the experiment scripts. run_once FOLDER TRAIN_ARGS...: `fracfx train TRAIN_ARGS`
# into FOLDER; a finished run (summary.json) is skipped, a killed one (checkpoint.pt) resumed.
run_once() {
    local folder=$1; shift
    if [ -f "$folder/summary.json" ]; then echo "$(basename "$folder"): done already ($folder)"; return 0; fi
    local resume=()
    [ -f "$folder/checkpoint.pt" ] && resume=(--resume "$folder")
    echo "== $(basename "$folder") -> $folder"
    fracfx train "$@" --save-folder "$folder" "${resume[@]}"
}
