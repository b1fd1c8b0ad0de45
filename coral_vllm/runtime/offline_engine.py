"""An offline `vllm.LLM` for checks and benchmarks, torn down on exit so the next fits.

Engine arguments default to this machine's (`engine_args.engine_defaults`: float32 and a
KV cache in bytes on the CPU, bf16 on a GPU); `gpu_only` ones apply on a GPU only.
"""

from __future__ import annotations

import contextlib
import gc
from pathlib import Path
from typing import Any, Iterator

from coral_vllm.runtime.engine_args import engine_defaults


@contextlib.contextmanager
def offline_engine(model: str | Path, speculative_config: dict[str, Any] | None = None, *,
                   gpu_only: dict[str, Any] | None = None, **kwargs: Any) -> Iterator[Any]:
    from vllm import LLM

    llm = LLM(model=str(model), seed=0, speculative_config=speculative_config,
              **{**engine_defaults(**(gpu_only or {})), **kwargs})
    try:
        yield llm
    finally:
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
