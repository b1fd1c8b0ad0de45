#!/usr/bin/env bash
# Sets everything up, then runs the test suite on the CPU against a real vLLM engine
# (Triton kernels run in the Triton interpreter). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${CORAL_VENV:-.venv}/bin/python" -m pytest tests "$@"
