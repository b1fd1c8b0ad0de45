#!/usr/bin/env bash
# Sets everything up, then serves SmolLM2-135M-Instruct with its CORAL drafter through
# `vllm serve`, asks it through the OpenAI API and prints the reply and the counters.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${CORAL_VENV:-.venv}/bin/coral-vllm" demo "$@"
