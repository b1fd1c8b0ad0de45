# Qwen2.5-Coder-1.5B-Instruct (docs/qwen-target.md), for scripts/train_gpu.sh: sourced by
# it when CORAL_PRESET=qwen2.5-coder-1.5b. Anything set before wins.
# The model: `coral-vllm fetch-model qwen2.5-coder-1.5b-instruct` (on a GPU host without
# an index: scripts/stage_gguf.sh). The prompts: `coral-vllm train conversations --mix
# code --out .gpu-data/qwen/code.jsonl.xz` (10,079 conversations, test sets excluded).
: "${CORAL_NAME:=qwen2.5-coder-1.5b}"
: "${CORAL_TARGET:=$HOME/.cache/coral-vllm/models/qwen2.5-coder-1.5b-instruct}"
: "${CORAL_CONVERSATIONS:=.gpu-data/qwen/code.jsonl.xz}"
# two engines: a 1.5B target keeps the GPU busier than SmolLM2 does (H200: 18.7k output
# tokens/s per engine with two, 5.5M tokens in 295 s)
: "${CORAL_DATA_ENGINES:=2}"
# 5 epochs of the ~9M-token data set: 1,468 steps, ~48M tokens, ~12 minutes at the
# ~68k tokens/s an H200 trains this drafter at, so the run fits one lease
: "${CORAL_TRAIN_ARGS:=--epochs 5}"
# the tables: tau at k = 1..6 on HumanEval (164), MT-bench (80), GSM8K (100);
# tok/s at batch 1 and 32, T = 0 and 1, on HumanEval, plain vs router / dense / static,
# and the router head with batch-shared groups (what batch 32 costs each way)
: "${CORAL_ACCEPTANCE_ARGS:=-k 6 --datasets humaneval mtbench gsm8k --limit 164}"
: "${CORAL_SHIP_K:=5}"
: "${CORAL_SHIP_E2E:=router dense static shared}"
: "${CORAL_E2E_ARGS:=--datasets humaneval --concurrency 1 32 --requests 16 64 --temperatures 0 1 --speedup-target 2.0}"
