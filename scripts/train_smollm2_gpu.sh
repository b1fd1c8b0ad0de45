#!/usr/bin/env bash
# The recipe behind the shipped SmolLM2-135M-Instruct drafters, in stages that each fit
# one 10-minute GPU-host command (run from the repo root after `source
# scripts/gpu_host_setup.sh`; every stage resumes where the last one stopped).
#   bash scripts/train_smollm2_gpu.sh data     # self-distilled responses (vLLM), ~8k prompts
#   bash scripts/train_smollm2_gpu.sh train    # EAGLE, HASS, CORAL side by side, same data/budget
#   bash scripts/train_smollm2_gpu.sh finish   # CORAL router, exports, offline tau (k=5)
# Work lives in $CORAL_WORK (default /root/coral-work); results in $OUT (default results/).
set -uo pipefail
M=${CORAL_TARGET:-$HOME/.cache/coral-vllm/models/smollm2-135m-instruct}
W=${CORAL_WORK:-/root/coral-work}
R=${OUT:-results}
MAX_STEPS=${CORAL_MAX_STEPS:-1500}
mkdir -p "$W" "$R"
train() {  # preset, same data and step budget for every drafter
  python3 -m coral_vllm.cli train train --preset "$1" --target "$M" --data "$W/data" \
    --out "$W/runs/$1" --max-steps "$MAX_STEPS" --epochs 100 --batch-size 16 --max-len 768 \
    --lr 3e-4 --time-limit-min "${CORAL_TIME_LIMIT_MIN:-8}" > "$R/train_$1.log" 2>&1
  echo "$1: exit $? ($(tail -c 300 "$R/train_$1.log" | tr '\r' '\n' | tail -n 1))"
}
case "${1:?stage: data | train | finish}" in
  data)
    python3 -m coral_vllm.cli train data --target "$M" --out "$W/data" --max-prompts 8000 \
      --max-new-tokens 384 --temperature 0 --backend vllm --chunk-prompts 4000 \
      --time-limit-min 7 2>&1 | tail -n 20
    cp "$W/data/manifest.json" "$R/dataset_manifest.json" ;;
  train)
    train eagle & train hass & train coral & wait ;;
  finish)
    python3 -m coral_vllm.cli train router --out "$W/runs/coral" 2>&1 | tail -n 15
    python3 -m coral_vllm.cli train export --run "$W/runs/eagle" --dest "$W/drafters/eagle" --dense --dtype bfloat16
    python3 -m coral_vllm.cli train export --run "$W/runs/hass" --dest "$W/drafters/hass" --dense --dtype bfloat16
    python3 -m coral_vllm.cli train export --run "$W/runs/coral" --dest "$W/drafters/coral" --dtype bfloat16
    for d in eagle hass coral; do
      tar -C "$W/drafters" -czf "$R/drafter_$d.tgz" "$d"
    done
    for b in mtbench humaneval; do
      python3 -m coral_vllm.cli train eval --target "$M" --drafters "$W/drafters/eagle" \
        "$W/drafters/hass" "$W/drafters/coral" --benchmarks "$b" --router both --k 5 \
        --max-new-tokens 256 --limit "${CORAL_EVAL_LIMIT:-40}" --json "$R/tau_$b.json" 2>&1 | tail -n 8
    done ;;
esac
