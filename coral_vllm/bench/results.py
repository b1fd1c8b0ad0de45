"""Benchmark result files, written atomically (each names the card it ran on:
`runtime.device.device_name`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_json(path: Path, obj: Any) -> None:
    """Replaces `path` in one step, so a run cut off mid-write leaves the last full result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)
