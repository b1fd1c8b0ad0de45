"""8B-scale systems benchmark, synthetic acceptance (same as `coral-vllm bench synthetic`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coral_vllm.bench.synthetic import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
