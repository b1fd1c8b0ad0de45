#!/usr/bin/env bash
# The GPU-host commands behind the GPU tables of the README (benchmarks/results/), one per
# 10-minute host command (run from the repo root; sources scripts/gpu_host_setup.sh itself).
#   bash scripts/bench_gpu.sh lm-head             # grouped LM-head kernel vs dense head
#   bash scripts/bench_gpu.sh lm-head-check       # the kernel's correctness + CUDA graphs
#   bash scripts/bench_gpu.sh serve-check         # vllm serve plain vs coral (shipped drafter)
#   bash scripts/bench_gpu.sh sampling-check      # T=1: plain vs coral vs stock EAGLE
#   bash scripts/bench_gpu.sh e2e                 # SmolLM2: plain / EAGLE / HASS / CORAL, vllm serve
#   bash scripts/bench_gpu.sh synthetic SHAPE     # llama-3.1-8b or qwen2.5-7b, dummy weights
#   bash scripts/bench_gpu.sh profile             # SmolLM2 draft-step time: EAGLE vs CORAL
#   bash scripts/bench_gpu.sh e2e-k1              # SmolLM2, k=1, MT-bench T=0, batch 1 and 32
#   bash scripts/bench_gpu.sh e2e-repeats         # MT-bench T=0, 3 rotated rounds: k=3 (c=1, 32), k=1 (c=1)
#   bash scripts/bench_gpu.sh load                # 64 streams for 4 min against vllm serve (load.json)
#   bash scripts/bench_gpu.sh seeds               # the CPU suite's same-seed-same-reply tests, on the GPU
# Drafters: .gpu-drafters/{eagle,hass} (`coral-vllm to-eagle` of the trained baselines),
# CORAL = the shipped one. Results and server logs go to $OUT (default results/); scratch
# (synthetic targets and drafters) to $CORAL_WORK (default /root/coral-work).
set -uo pipefail
source scripts/gpu_host_setup.sh > /tmp/gpu_host_setup.log 2>&1 || { tail -n 20 /tmp/gpu_host_setup.log; exit 1; }
R=${OUT:-results}
W=${CORAL_WORK:-/root/coral-work}
mkdir -p "$R"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$R/gpu.csv"
bench() { python3 -m coral_vllm.cli bench "$@"; }
quiet() { grep -v "^(\|^INFO\|^WARNING\|^\[" | tail -n "$1"; }  # vLLM's log lines out
case "${1:?lm-head | lm-head-check | serve-check | sampling-check | e2e | e2e-k1 | e2e-repeats | profile | synthetic SHAPE | load | seeds}" in
  lm-head)
    bench lm-head --out "$R/lm_head.json" ;;
  lm-head-check)
    bench lm-head --check ;;
  serve-check)
    bench serve-check --out "$R/serve_check.json" --log-dir "$R/logs_serve_check" 2>&1 | quiet 20 ;;
  sampling-check)
    bench sampling-check --out "$R/sampling_check.json" 2>&1 | quiet 20 ;;
  e2e)
    bench e2e -k "${K:-3}" --drafters eagle=.gpu-drafters/eagle \
      hass=.gpu-drafters/hass coral=coral_vllm/assets/drafters/smollm2-135m-instruct \
      --out "$R/e2e_smollm2.json" --log-dir "$R/logs" ;;
  profile)
    bench profile -k "${K:-3}" --drafters eagle=.gpu-drafters/eagle \
      coral=coral_vllm/assets/drafters/smollm2-135m-instruct \
      --out "$R/draft_step_profile.json" 2>&1 | quiet 20 ;;
  e2e-k1)
    bench e2e -k 1 --drafters eagle=.gpu-drafters/eagle \
      hass=.gpu-drafters/hass coral=coral_vllm/assets/drafters/smollm2-135m-instruct \
      --datasets mtbench --temperatures 0 --concurrency 1 32 --requests 16 64 \
      --out "$R/e2e_smollm2_k1.json" --log-dir "$R/logs_k1" ;;
  e2e-repeats)
    for k in 3 1; do
      conc=(1 32); req=(16 64); [ "$k" = 1 ] && conc=(1) && req=(16)
      bench e2e -k "$k" --drafters eagle=.gpu-drafters/eagle \
        hass=.gpu-drafters/hass coral=coral_vllm/assets/drafters/smollm2-135m-instruct \
        --datasets mtbench --temperatures 0 --concurrency "${conc[@]}" --requests "${req[@]}" \
        --repeats 3 --out "$R/e2e_smollm2_repeats_k$k.json" --log-dir "$R/logs_r$k" | tail -n 12
    done ;;
  load)  # float32: T=0 replies that do not depend on how requests are batched
    bench load --duration-s 240 --concurrency 64 --gpu-dtype float32 \
      --out "$R/load.json" --log-dir "$R/logs_load" 2>&1 | quiet 20 ;;
  seeds)
    python3 -m pytest -q -p no:cacheprovider tests/test_lossless.py -k same_seed 2>&1 \
      | tail -n 15 ;;
  synthetic)
    prior=()
    [ -f benchmarks/results/e2e_synthetic.json ] && [ -n "${EXTEND:-}" ] && \
      prior=(--extend benchmarks/results/e2e_synthetic.json)
    bench synthetic --shapes "${2:?shape}" "${prior[@]}" \
      --work-dir "$W/synthetic" --out "$R/e2e_synthetic.json" 2>&1 | quiet 80 ;;
esac
