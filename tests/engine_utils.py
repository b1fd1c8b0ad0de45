"""Running a real vLLM engine inside a test process and shutting it down again."""

from __future__ import annotations

import contextlib
import gc
import os
from pathlib import Path
from typing import Any, Iterator

from coral_vllm.smoke_prompts import SMOKE_PROMPTS

PROMPTS = SMOKE_PROMPTS
# lets tests send a function to vLLM's workers (LLM.collective_rpc) to inspect the drafter
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")


@contextlib.contextmanager
def engine(target_dir: Path, speculative_config: dict[str, Any] | None = None,
           **kwargs: Any) -> Iterator[Any]:
    """A float32 CPU engine with stats on, torn down on exit so the next one fits."""
    from vllm import LLM

    llm = LLM(model=str(target_dir), dtype="float32", max_model_len=1024, seed=0,
              kv_cache_memory_bytes=1 << 30, disable_log_stats=False,
              speculative_config=speculative_config, **kwargs)
    try:
        yield llm
    finally:
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def chat(llm: Any, prompts: list[str], params: Any) -> list[list[int]]:
    outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params,
                    use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]
