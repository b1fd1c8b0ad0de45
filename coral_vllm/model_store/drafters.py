"""Where a target's default CORAL drafter comes from.

A trained drafter shipped inside the package (`coral_vllm/assets/drafters/<model>`) is
used when there is one; otherwise an untrained, correctly shaped drafter is generated
once into the cache (and says so: `"trained": false`, logged as UNTRAINED when served).
"""

from __future__ import annotations

from pathlib import Path

from coral_vllm.model_store.targets import DEFAULT_MODEL, cache_root, fetch_model

ASSETS = Path(__file__).parents[1] / "assets" / "drafters"


def shipped_drafter(model: str = DEFAULT_MODEL) -> Path | None:
    path = ASSETS / model
    return path if (path / "config.json").is_file() else None


def default_drafter(model: str = DEFAULT_MODEL) -> Path:
    shipped = shipped_drafter(model)
    if shipped is not None:
        return shipped
    from coral_vllm.model_store.drafter_init import init_drafter

    path = cache_root() / "drafters" / f"{model}-untrained"
    if not (path / "config.json").is_file():
        init_drafter(fetch_model(model), path)
    return path
