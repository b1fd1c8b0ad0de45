"""End-to-end benchmark, real acceptance (same as `coral-vllm bench e2e`; see -h)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coral_vllm.bench.e2e import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
