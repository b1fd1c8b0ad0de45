"""Running a real vLLM engine inside a test process and shutting it down again.

Test engines differ from the product's defaults in two ways, both for start-up time on a
CPU and neither for what the tests check:

- eager on a CPU (`enforce_eager=True`): torch.compile more than doubles an engine's
  start (SmolLM2-135M on 2 cores: 39 s eager, 86 s compiled) and changes no token the
  tests compare, since the plain reference and the speculative engine run the same way.
  Serving under torch.compile is covered by tests/test_serve_openai.py, whose
  `vllm serve` runs with the product defaults. On a GPU (scripts/bench_gpu.sh seeds)
  engines keep vLLM's default, compiled with CUDA graphs.
- in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0): the engine core runs in the test
  process instead of a fresh process that imports torch and vLLM again, so every engine
  after the first starts in seconds. Workers of a TP > 1 engine are still processes of
  their own; `engine(..., in_process=False)` gives the product's process layout (the
  plugin's entry point must load there by itself: tests/test_served_drafter.py).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

from coral_vllm.bench.smoke_prompts import SMOKE_PROMPTS
from coral_vllm.runtime.device import on_cpu
from coral_vllm.runtime.offline_engine import offline_engine

PROMPTS = SMOKE_PROMPTS
# lets tests send a function to vLLM's workers (LLM.collective_rpc) to inspect the drafter
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
_IN_PROCESS = "VLLM_ENABLE_V1_MULTIPROCESSING"


@contextlib.contextmanager
def engine(target_dir: Path, speculative_config: dict[str, Any] | None = None, *,
           in_process: bool = True, **kwargs: Any) -> Iterator[Any]:
    """An engine with stats on and this machine's defaults (float32 on a CPU; see
    coral_vllm.runtime.offline_engine), eager on a CPU unless `enforce_eager=False`."""
    kwargs.setdefault("enforce_eager", on_cpu())
    with engines_in_process(in_process), \
            offline_engine(target_dir, speculative_config, max_model_len=1024,
                           disable_log_stats=False, **kwargs) as llm:
        yield llm


@contextlib.contextmanager
def engines_in_process(in_process: bool = True) -> Iterator[None]:
    """Engines made inside (e.g. by a `coral-vllm bench` command) run their core in this
    process, or in their own with `in_process=False`."""
    before = os.environ.get(_IN_PROCESS)
    os.environ[_IN_PROCESS] = "0" if in_process else "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(_IN_PROCESS, None)
        else:
            os.environ[_IN_PROCESS] = before


def ask(llm: Any, prompts: list[str], params: Any, chat: bool = True) -> list[Any]:
    """vLLM's outputs for `prompts`, as chat turns (an instruct target) or raw text."""
    if chat:
        return llm.chat([[{"role": "user", "content": p}] for p in prompts], params,
                        use_tqdm=False)
    return llm.generate(prompts, params, use_tqdm=False)


def chat(llm: Any, prompts: list[str], params: Any) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in ask(llm, prompts, params)]
