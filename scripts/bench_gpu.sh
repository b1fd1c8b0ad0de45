#!/usr/bin/env bash
# The GPU-host commands behind benchmarks/results/e2e_*.json, one per 10-minute host command
# (run from the repo root; sources scripts/gpu_host_setup.sh itself).
#   bash scripts/bench_gpu.sh e2e                 # SmolLM2: plain / EAGLE / HASS / CORAL, vllm serve
#   bash scripts/bench_gpu.sh synthetic SHAPE     # llama-3.1-8b or qwen2.5-7b, dummy weights
#   bash scripts/bench_gpu.sh profile             # SmolLM2 draft-step time: EAGLE vs CORAL
#   bash scripts/bench_gpu.sh e2e-k1              # SmolLM2, k=1, MT-bench T=0, batch 1 and 32
#   bash scripts/bench_gpu.sh e2e-repeats         # MT-bench T=0, 3 rotated rounds: k=3 (c=1, 32), k=1 (c=1)
# Drafters: .gpu-drafters/{eagle,hass} (`coral-vllm to-eagle` of the trained baselines),
# CORAL = the shipped one. Results and server logs go to $OUT (default results/).
set -uo pipefail
source scripts/gpu_host_setup.sh > /tmp/gpu_host_setup.log 2>&1 || { tail -n 20 /tmp/gpu_host_setup.log; exit 1; }
export VLLM_WORKER_MULTIPROC_METHOD=spawn VLLM_USE_FLASHINFER_SAMPLER=0
R=${OUT:-results}
mkdir -p "$R"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$R/gpu.csv"
case "${1:?e2e | synthetic SHAPE}" in
  e2e)
    python3 -m coral_vllm.cli bench e2e -k "${K:-3}" --drafters eagle=.gpu-drafters/eagle \
      hass=.gpu-drafters/hass coral=coral_vllm/assets/drafters/smollm2-135m-instruct \
      --out "$R/e2e_smollm2.json" --log-dir "$R/logs" ;;
  profile)
    python3 -m coral_vllm.cli bench profile -k "${K:-3}" --drafters eagle=.gpu-drafters/eagle \
      coral=coral_vllm/assets/drafters/smollm2-135m-instruct \
      --out "$R/draft_step_profile.json" 2>&1 | grep -v "^(\|^INFO\|^WARNING\|^\[" | tail -n 20 ;;
  e2e-k1)
    python3 -m coral_vllm.cli bench e2e -k 1 --drafters eagle=.gpu-drafters/eagle \
      hass=.gpu-drafters/hass coral=coral_vllm/assets/drafters/smollm2-135m-instruct \
      --datasets mtbench --temperatures 0 --concurrency 1 32 --requests 16 64 \
      --out "$R/e2e_smollm2_k1.json" --log-dir "$R/logs_k1" ;;
  e2e-repeats)
    for k in 3 1; do
      conc=(1 32); req=(16 64); [ "$k" = 1 ] && conc=(1) && req=(16)
      python3 -m coral_vllm.cli bench e2e -k "$k" --drafters eagle=.gpu-drafters/eagle \
        hass=.gpu-drafters/hass coral=coral_vllm/assets/drafters/smollm2-135m-instruct \
        --datasets mtbench --temperatures 0 --concurrency "${conc[@]}" --requests "${req[@]}" \
        --repeats 3 --out "$R/e2e_smollm2_repeats_k$k.json" --log-dir "$R/logs_r$k" | tail -n 12
    done ;;
  synthetic)
    prior=()
    [ -f benchmarks/results/e2e_synthetic.json ] && [ -n "${EXTEND:-}" ] && \
      prior=(--extend benchmarks/results/e2e_synthetic.json)
    python3 -m coral_vllm.cli bench synthetic --shapes "${2:?shape}" "${prior[@]}" \
      --work-dir /root/coral-synthetic --out "$R/e2e_synthetic.json" 2>&1 \
      | grep -v "^(\|^INFO\|^WARNING\|^\[" | tail -n 80 ;;
esac
