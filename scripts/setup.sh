#!/usr/bin/env bash
# One-time setup on a fresh Debian machine with Python 3.11 + pip, as root (or with sudo):
# the offline datasets from Debian, then fracfx with its test extra (torch 2.14.1 comes from the
# local wheel cache that pip uses on these machines). Safe to run again: it skips what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
[ -d /usr/share/datasets/fashion-mnist ] || need_apt+=(dataset-fashion-mnist)
command -v bible >/dev/null 2>&1 || need_apt+=(bible-kjv)
if [ ${#need_apt[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "setup: installing Debian packages: ${need_apt[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# Reinstall when anything is missing, torch is another version, or fracfx (and its passes and
# runtime packages) resolve to another checkout than this one: an editable install points at one
# folder, and a fresh clone elsewhere must test its own code.
here=$(pwd -P)
if ! python -c "import fracfx, torch, torchvision, onnxruntime, pytest, ninja, transformers, timm" >/dev/null 2>&1 \
   || [ "$(python -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null)" != "2.14.1" ] \
   || [ "$(cd / && python -c 'import os, fracfx.passes; print(os.path.dirname(os.path.dirname(os.path.realpath(fracfx.passes.__file__))))' 2>/dev/null)" != "$here" ]; then
    echo "setup: installing fracfx (editable) with torch==2.14.1, torchvision==0.29.1 and the test, hf and timm extras"
    python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
    python -m pip install -q -e ".[test,hf,timm]"
fi
# the fused quantizer kernels (C++, ~15 s once; fracfx falls back to eager torch code without them)
python -m fracfx.nn.kernels --build || echo "setup: fused quantizer kernels not built; fracfx will use its eager quantizers"
echo "setup: ok"
