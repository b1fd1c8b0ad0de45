"""An offline `vllm.LLM` for checks and benchmarks, torn down on exit so the next fits.

CPU: float32 (greedy outputs then match plain decoding exactly) and a KV cache sized in
bytes (the CPU backend reads gpu_memory_utilization as a share of RAM). GPU: bf16.
"""

from __future__ import annotations

import contextlib
import gc
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def offline_engine(model: str | Path, speculative_config: dict[str, Any] | None = None,
                   **kwargs: Any) -> Iterator[Any]:
    import torch
    from vllm import LLM

    defaults: dict[str, Any] = (
        {"dtype": "bfloat16"} if torch.cuda.is_available()
        else {"dtype": "float32", "kv_cache_memory_bytes": 1 << 30})
    llm = LLM(model=str(model), seed=0, speculative_config=speculative_config,
              **{**defaults, **kwargs})
    try:
        yield llm
    finally:
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
