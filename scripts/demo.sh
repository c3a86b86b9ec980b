#!/usr/bin/env bash
# The main job on the bundled sample (19 real VOC 2012 photos with their labels):
#   scripts/demo.sh             Stable Diffusion v1.4 from the Hugging Face hub (or its cache)
#   scripts/demo.sh --offline   no hub: a tiny RANDOM model; the masks are meaningless and
#                               only show that the whole pipeline runs
# Extra arguments go to `text2mask generate` (e.g. --device cuda --samples 10).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
offline=0
args=()
for a in "$@"; do
    if [ "$a" = "--offline" ]; then offline=1; else args+=("$a"); fi
done
if [ "$offline" = 1 ]; then
    [ -d runs/tiny-sd ] || python scripts/make_tiny_model.py runs/tiny-sd
    echo "*** OFFLINE SMOKE MODE: tiny random model; masks and mIoU are MEANINGLESS ***" >&2
    text2mask generate --dataset voc --data-root samples/voc-mini/VOC2012 --split train \
        --model runs/tiny-sd --out runs/demo-offline-MEANINGLESS "${args[@]}"
    echo "*** outputs in runs/demo-offline-MEANINGLESS (random model: meaningless) ***" >&2
else
    set +e
    text2mask generate --dataset voc --data-root samples/voc-mini/VOC2012 --split train \
        --model CompVis/stable-diffusion-v1-4 --out runs/demo "${args[@]}"
    rc=$?
    set -e
    if [ "$rc" -eq 2 ]; then
        echo "hint: if the model could not be loaded because this machine cannot reach the Hugging Face" \
             "hub (and has no cached copy), run: scripts/demo.sh --offline (a tiny random model: the" \
             "masks are meaningless, the pipeline is real)" >&2
    fi
    exit "$rc"
fi
