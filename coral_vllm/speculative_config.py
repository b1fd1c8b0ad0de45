"""The speculative config a user hands vLLM for CORAL, and its one default, k.

    vllm serve TARGET --speculative-config \
        '{"method": "coral", "model": "DRAFTER_DIR", "num_speculative_tokens": 3}'

`"method": "coral"` (the plugin, `serving.plugin`, turns it into vLLM's own eagle or
eagle3 config), the drafter directory, and k draft tokens a step. Every drafter setting
(groups, top-k, partition) lives in the drafter's config.json, because vLLM's
`SpeculativeConfig` refuses keys it does not know; vLLM's own keys
(`draft_sample_method`, `max_model_len`, ...) pass through.
"""

from __future__ import annotations

import os
from typing import Any

METHOD = "coral"
NUM_SPECULATIVE_TOKENS = 3  # k: draft tokens per step, where a command is not told


def speculative_config(drafter: str | os.PathLike[str],
                       k: int = NUM_SPECULATIVE_TOKENS, *, method: str = METHOD,
                       **extra: Any) -> dict[str, Any]:
    """The `--speculative-config` (`speculative_config=`) dict for `drafter`: the coral
    method, or a stock one (`method="eagle"`) for the baselines it is compared with;
    `extra` are vLLM's own keys."""
    return {"method": method, "model": str(drafter), "num_speculative_tokens": k, **extra}
