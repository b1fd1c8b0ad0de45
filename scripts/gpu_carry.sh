#!/usr/bin/env bash
# Builds, on the development machine (PyPI reachable), everything a GPU-host lease carries
# in besides the checkout, in the git-ignored folders the plans name; skips what is there.
# A new checkout has none of them (they are not committed), so run this before planning
# a lease on one:
#   .gpu-data/up1/conversations.jsonl.xz   the `all` prompt mix (SmolLM2, Qwen all preset)
#   .gpu-data/qwen/code.jsonl.xz           the `code` mix (the Qwen code preset)
#   .gpu-data/w/                           evaluation sets' wheels (CORAL_VLLM_WHEELS)
#   .gpu-model/qwen2.5-coder-1.5b-instruct/pNN   the Qwen GGUF in pieces (scripts/stage_gguf.sh)
#   .gpu-bundle/pNN                        vLLM 0.26 and the SmolLM2 GGUF (../shared/gpu-host)
# What a lease sends back (replies, drafters, run state) cannot be rebuilt here: keep it
# under .gpu-data/sN as it comes.
set -euo pipefail
cd "$(dirname "$0")/.."
cli=(python3 -m coral_vllm.cli)
[ -x .venv/bin/python ] && cli=(.venv/bin/python -m coral_vllm.cli)
[ -f .gpu-data/up1/conversations.jsonl.xz ] || \
  "${cli[@]}" train conversations --out .gpu-data/up1/conversations.jsonl.xz
[ -f .gpu-data/qwen/code.jsonl.xz ] || \
  "${cli[@]}" train conversations --mix code --out .gpu-data/qwen/code.jsonl.xz
"${cli[@]}" wheels --dest .gpu-data/w > /dev/null
[ -f .gpu-model/qwen2.5-coder-1.5b-instruct/p00/MANIFEST ] || \
  "${cli[@]}" gguf-pieces qwen2.5-coder-1.5b-instruct | tail -n 1
[ -f .gpu-bundle/p00/stage.sh ] || bash ../shared/gpu-host/make-bundle | tail -n 3
ls -d .gpu-data/up1 .gpu-data/qwen .gpu-data/w .gpu-model/*/ .gpu-bundle/p*
