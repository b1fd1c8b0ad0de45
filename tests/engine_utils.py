"""Running a real vLLM engine inside a test process and shutting it down again."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from coral_vllm.bench.smoke_prompts import SMOKE_PROMPTS
from coral_vllm.runtime.offline_engine import offline_engine

PROMPTS = SMOKE_PROMPTS
# lets tests send a function to vLLM's workers (LLM.collective_rpc) to inspect the drafter
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")


def engine(target_dir: Path, speculative_config: dict[str, Any] | None = None,
           **kwargs: Any):
    """A float32 CPU engine with stats on (see coral_vllm.runtime.offline_engine)."""
    return offline_engine(target_dir, speculative_config, max_model_len=1024,
                          disable_log_stats=False, **kwargs)


def plain_greedy(target_dir: Path, max_tokens: int) -> list[list[int]]:
    """The target's own greedy replies to PROMPTS (what speculation must reproduce)."""
    from vllm import SamplingParams

    with engine(target_dir) as llm:
        return chat(llm, PROMPTS, SamplingParams(temperature=0, max_tokens=max_tokens))


def chat(llm: Any, prompts: list[str], params: Any) -> list[list[int]]:
    outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params,
                    use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def record_draft_support(worker) -> None:
    """Runs inside vLLM's worker: wraps the hand-over of draft probabilities to the
    rejection sampler so each step records how many tokens have non-zero draft probability."""
    proposer = worker.model_runner.drafter
    proposer.coral_support = []
    take = proposer.take_last_draft_probs

    def recorded():
        probs = take()
        if probs is not None:
            proposer.coral_support.append(int((probs > 0).sum(-1).max()))
        return probs

    proposer.take_last_draft_probs = recorded


def draft_support(worker) -> list[int]:
    return worker.model_runner.drafter.coral_support


def coral_run_and_probe(target_dir: Path, drafter: Path, k: int, max_tokens: int,
                        probe: str, inspect, record_next) -> dict[str, Any]:
    """One CORAL engine over `drafter`: its greedy replies to PROMPTS ("out"), their
    speculation stats, `inspect(worker)`'s answer ("inspected"), then the raw prompt
    `probe` decoded with `record_next` installed on the worker ("probe_ids", and the
    drafter model's `coral_record` as "record")."""
    from vllm import SamplingParams

    from coral_vllm.runtime.metrics import from_llm_metrics

    spec = {"method": "coral", "model": str(drafter), "num_speculative_tokens": k}
    with engine(target_dir, spec) as llm:
        out = chat(llm, PROMPTS, SamplingParams(temperature=0, max_tokens=max_tokens))
        stats = from_llm_metrics(llm.get_metrics())
        inspected = llm.collective_rpc(inspect)[0]
        llm.collective_rpc(record_next)
        ids = llm.generate([probe], SamplingParams(temperature=0, max_tokens=2),
                           use_tqdm=False)[0].prompt_token_ids
        record = llm.collective_rpc(_drafter_record)[0]
    return {"out": out, "stats": stats, "inspected": inspected, "probe_ids": ids,
            "record": record}


def _drafter_record(worker) -> dict:
    return worker.model_runner.drafter.model.coral_record
