"""What every benchmark result file carries: the card it ran on, written atomically."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any


def device_name() -> str:
    """The GPU's name, or the CPU (where the engines run in float32)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.machine()}), float32"


def write_json(path: Path, obj: Any) -> None:
    """Replaces `path` in one step, so a run cut off mid-write leaves the last full result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)
