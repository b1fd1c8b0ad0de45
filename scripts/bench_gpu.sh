#!/usr/bin/env bash
# The GPU-host commands behind the GPU tables of docs/benchmarks.md (benchmarks/results/), one per
# 10-minute host command (run from the repo root; sources scripts/gpu_host_setup.sh itself).
#   bash scripts/bench_gpu.sh lm-head             # grouped LM-head kernel vs dense head
#   bash scripts/bench_gpu.sh lm-head-check       # the kernel's correctness + CUDA graphs
#   bash scripts/bench_gpu.sh soft-ce             # training loss: soft_ce kernels vs torch (check + soft_ce.json)
#   bash scripts/bench_gpu.sh serve-check         # vllm serve plain vs coral (shipped drafter)
#   bash scripts/bench_gpu.sh sampling-check      # T=1: plain vs coral vs stock EAGLE
#   bash scripts/bench_gpu.sh e2e DATASET T       # SmolLM2: plain / EAGLE / HASS / CORAL, vllm serve
#                                                 # (mtbench|humaneval|gsm8k, 0|1: ~6-7 min each)
#   bash scripts/bench_gpu.sh synthetic SHAPE...  # systems table, dummy weights (see below)
#   bash scripts/bench_gpu.sh profile             # SmolLM2 draft-step time: EAGLE vs CORAL
#   bash scripts/bench_gpu.sh e2e-k1              # SmolLM2, k=1, MT-bench T=0, batch 1 and 32
#   bash scripts/bench_gpu.sh load                # 64 streams for 4 min against vllm serve (load.json)
#   bash scripts/bench_gpu.sh seeds               # the CPU suite's same-seed-same-reply tests, on the GPU
# Every benchmark measures each cell in 5 rounds, variants interleaved in a rotated order,
# each generation measurement >= 2 s (coral_vllm/bench/rounds.py), and reports medians with
# intervals; a difference or a met target is called only where the intervals allow it.
# Systems table (issue 21), one command per shape, in this order, each <= 10 min:
#   bash scripts/bench_gpu.sh synthetic qwen2.5-1.5b   # ~6-7 min
#   bash scripts/bench_gpu.sh synthetic llama-3.1-8b   # ~6-7 min
#   bash scripts/bench_gpu.sh synthetic qwen2.5-7b     # ~6-7 min
#   bash scripts/bench_gpu.sh lm-head                  # ~5-8 min (forced paths and sweep
#                                                      # dropped past its 300 s --budget)
# Estimate per shape (not measured yet): start of 5 engines at once with torch.compile,
# 1.5-2.5 min (less with a warm compile cache), then 4 batch sizes x 5 variants x (5 rounds
# + 1 pilot pass) of >= 2.2 s each, ~4.5 min. Plain, dense-head EAGLE, static (~32k rows),
# CORAL with per-token groups and CORAL with batch-shared groups (`coral-shared`) at
# batch 1, 8, 32, 64, synthetic acceptance 3.5 (the targets' length; another
# with ACCEPTANCE=..., each one more ~3 min). A shape finished on this host ($W) or in the
# carried benchmarks/results/e2e_synthetic.json (copy each returned file there before the
# next command on a fresh host) is skipped: naming a done shape again starts no engine.
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
case "${1:?lm-head | lm-head-check | soft-ce | serve-check | sampling-check | e2e DATASET T | e2e-k1 | profile | synthetic SHAPE... | load | seeds}" in
  lm-head)
    bench lm-head --out "$R/lm_head.json" ;;
  lm-head-check)
    bench lm-head --check ;;
  soft-ce)  # the check first: no timings of a path that disagrees
    bench soft-ce --check && bench soft-ce --out "$R/soft_ce.json" ;;
  serve-check)
    bench serve-check --out "$R/serve_check.json" --log-dir "$R/logs_serve_check" 2>&1 | quiet 20 ;;
  sampling-check)
    bench sampling-check --out "$R/sampling_check.json" 2>&1 | quiet 20 ;;
  e2e)  # one dataset and temperature per command: 3 cells x 4 servers x 6 measurements
    bench e2e -k "${K:-3}" --drafters eagle=.gpu-drafters/eagle \
      hass=.gpu-drafters/hass coral=coral_vllm/assets/drafters/smollm2-135m-instruct \
      --datasets "${2:?DATASET}" --temperatures "${3:?T}" \
      --out "$R/e2e_smollm2_${2}_t${3}.json" --log-dir "$R/logs_${2}_t${3}" ;;
  profile)
    bench profile -k "${K:-3}" --drafters eagle=.gpu-drafters/eagle \
      coral=coral_vllm/assets/drafters/smollm2-135m-instruct \
      --out "$R/draft_step_profile.json" 2>&1 | quiet 20 ;;
  e2e-k1)
    bench e2e -k 1 --drafters eagle=.gpu-drafters/eagle \
      hass=.gpu-drafters/hass coral=coral_vllm/assets/drafters/smollm2-135m-instruct \
      --datasets mtbench --temperatures 0 --concurrency 1 32 --requests 16 64 \
      --out "$R/e2e_smollm2_k1.json" --log-dir "$R/logs_k1" ;;
  load)  # float32: T=0 replies that do not depend on how requests are batched
    bench load --duration-s 240 --concurrency 64 --gpu-dtype float32 \
      --out "$R/load.json" --log-dir "$R/logs_load" 2>&1 | quiet 20 ;;
  seeds)
    python3 -m pytest -q -p no:cacheprovider tests/test_lossless.py -k same_seed 2>&1 \
      | tail -n 15 ;;
  synthetic)  # resumable: shapes an earlier same-settings run finished are kept, not rerun
    shift
    [ $# -gt 0 ] || { echo "synthetic SHAPE...: qwen2.5-1.5b, llama-3.1-8b, qwen2.5-7b" >&2; exit 2; }
    prior=benchmarks/results/e2e_synthetic.json
    [ -f "$W/e2e_synthetic.json" ] && prior="$W/e2e_synthetic.json"
    # ACCEPTANCE unquoted: several lengths split into several arguments
    bench synthetic --shapes "$@" --acceptance ${ACCEPTANCE:-3.5} --resume "$prior" \
      --work-dir "$W/synthetic" --out "$R/e2e_synthetic.json" 2>&1 | quiet 80 \
      && mkdir -p "$W" && cp "$R/e2e_synthetic.json" "$W/" ;;
esac
