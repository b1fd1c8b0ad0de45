"""Shared fixtures: the real default target (converted from PyPI once), drafters, and the
engine runs the lossless tests share (one plain engine per target, two per drafter kind,
started on first use: tests/engine_runs.py).

A test that asks for `runs` starts engines, so it must carry the `engine` marker (the
fast tier, `pytest -m "not engine"`, deselects them); collection fails if one does not.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # The Triton kernels' tests run them in Triton's interpreter on a CPU. The variable
    # must be set before anything imports triton (vLLM does, on import): a kernel defined
    # before it is compiled for a GPU and fails in the interpreter ("Cannot call
    # @triton.jit'd outside of the scope of a kernel"). Set here, before any test module.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from coral_vllm.model_store.drafter_init import init_drafter  # noqa: E402
from coral_vllm.model_store.targets import fetch_model  # noqa: E402
from drafter_kinds import Drafters  # noqa: E402
from engine_runs import EngineRuns  # noqa: E402

ENGINE_FIXTURES = {"runs"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    unmarked = [item.nodeid for item in items
                if ENGINE_FIXTURES & set(getattr(item, "fixturenames", ()))
                and item.get_closest_marker("engine") is None]
    if unmarked:
        raise pytest.UsageError("these tests start engines (fixture 'runs') but are not "
                                "marked `engine`: " + ", ".join(unmarked))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one thread is as fast, and immune to OpenMP spin-waiting when the
    CI box is shared (2 threads on 2 busy cores made test_training.py 40x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def target_dir() -> Path:
    return fetch_model()


@pytest.fixture(scope="session")
def gemma_dir() -> Path:
    """Gemma-3-270M (a base model, vocabulary 262,144), converted once like the default."""
    return fetch_model("gemma3-270m")


@pytest.fixture(scope="session")
def random_drafter(target_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained drafter for the real target (plumbing and error cases)."""
    return init_drafter(target_dir, tmp_path_factory.mktemp("drafters") / "random",
                        partition="cluster", seed=1)


@pytest.fixture(scope="session")
def drafters(tmp_path_factory: pytest.TempPathFactory) -> Drafters:
    """Every kind's target and drafter on disk (tests/drafter_kinds.py), made on first use."""
    return Drafters(tmp_path_factory)


@pytest.fixture(scope="session")
def runs(drafters: Drafters, tmp_path_factory: pytest.TempPathFactory) -> EngineRuns:
    return EngineRuns(drafters, tmp_path_factory)
