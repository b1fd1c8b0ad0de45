"""Does the offline tau predict serving? Both on the same dev prompts, same drafters.

For every drafter: the offline chain tau that training selects checkpoints by
(validate.chain_tau over the dev continuations stored in the data directory, with the
head the drafter serves with: the router's groups if it activates fewer than all), and
the tau vLLM's own counters give when it serves the same prompts with `method: coral`,
greedy, k draft tokens, each request asking for as many tokens as its stored
continuation has. vLLM's replies are compared with the stored continuations too: they
are the same tokens unless bf16 near-ties flip between the two engines (verifying k + 1
tokens at once rounds differently from decoding one); so the offline tau is also replayed
on vLLM's own replies, which separates the replay's error from the texts' difference.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from coral_vllm.data.shards import load_dev


def vllm_tau(target: str, drafter: str, prompts: list[list[int]], max_tokens: list[int],
             k: int, enforce_eager: bool) -> dict[str, Any]:
    """vLLM's tau and outputs for one drafter (one offline engine)."""
    from vllm import SamplingParams, TokensPrompt

    from coral_vllm.runtime.metrics import from_llm_metrics
    from coral_vllm.runtime.offline_engine import offline_engine
    from coral_vllm.speculative_config import speculative_config

    # 4096, or the target's positions if fewer (a tiny test target has 2048). Not the
    # longest request's length: near max_model_len vLLM drafts fewer tokens per round,
    # which changes the rounds it counts (seen: 64 drafts instead of 62)
    from transformers import AutoConfig

    positions = getattr(AutoConfig.from_pretrained(target).get_text_config(),
                        "max_position_embeddings", None) or 4096
    max_len = min(4096, positions)
    need = max(len(p) + m for p, m in zip(prompts, max_tokens)) + k
    if need > max_len:
        raise ValueError(f"a dev prompt and its continuation need {need} positions, more "
                         f"than the engine's {max_len}; pass fewer --limit prompts or "
                         "shorter data (--max-len)")
    with offline_engine(target, speculative_config(drafter, k), max_model_len=max_len,
                        disable_log_stats=False, enforce_eager=enforce_eager,
                        gpu_only={"gpu_memory_utilization": 0.5}) as llm:
        before = from_llm_metrics(llm.get_metrics())
        t = time.time()
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                            [SamplingParams(temperature=0, max_tokens=m, ignore_eos=False)
                             for m in max_tokens], use_tqdm=False)
        seconds = time.time() - t
        stats = from_llm_metrics(llm.get_metrics()) - before
    return {"tau": stats.acceptance_length, "per_position": stats.per_position_rate,
            "drafts": stats.num_drafts, "seconds": seconds,
            "outputs": [list(o.outputs[0].token_ids) for o in outs]}


def _split(model, prompts: list[list[int]], conts: list[list[int]], dev):
    """Prompts + continuations as an EvalSplit with the target's features."""
    from coral_vllm.data.batches import TokenTable
    from coral_vllm.data.feature_store import compute_features
    from coral_vllm.training.validate import EvalSplit

    samples = [(np.array(p + c), np.r_[np.zeros(len(p)), np.ones(len(c))])
               for p, c in zip(prompts, conts)]
    table = TokenTable.from_samples(samples, 1 << 20)
    return EvalSplit(table, compute_features(model, table, dev),
                     np.array([len(p) for p in prompts]))


def offline_taus(target: str, drafters: dict[str, str], prompts: list[list[int]],
                 stored: list[list[int]], served: dict[str, list[list[int]]], k: int
                 ) -> dict[str, dict[str, Any]]:
    """Offline chain tau per drafter, with the head it serves with, replayed on the
    stored continuations (what training validates on) and on the tokens vLLM itself
    produced for that drafter (the same text vLLM's counters saw)."""
    import torch

    from coral_vllm.training.evaluate import load_drafter, tau_of_drafters
    from coral_vllm.data.target import load_target

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _, _ = load_target(target, dev)
    on_stored = _split(model, prompts, stored, dev)
    out = {}
    for name, path in drafters.items():
        drafter = load_drafter(path, model, dev)
        routed = drafter.coral.top_k_groups < drafter.coral.num_groups  # type: ignore[attr-defined]
        pick = lambda split: {r["router"]: r for r in tau_of_drafters(  # noqa: E731
            model, {name: drafter}, split, k=k)}[routed]
        a, b = pick(on_stored), pick(_split(model, prompts, served[name], dev))
        out[name] = {"router": routed, "offline_tau": a["tau"], "offline_rounds": a["rounds"],
                     "offline_tau_on_vllm_outputs": b["tau"]}
    return out


def compare(target: str, data: str, drafters: dict[str, str], *, k: int = 5,
            limit: int | None = None, enforce_eager: bool = True,
            out_json: str | None = None) -> dict[str, Any]:
    """Offline vs vLLM tau per drafter on the data directory's dev prompts. vLLM runs
    first (each engine torn down after), then the target for the offline replays."""
    from coral_vllm.runtime.device import device_name

    table, prompt_lens = load_dev(data, 1 << 20)
    if table is None:
        raise ValueError(f"{data}: no dev prompts (data made before dev splits existed)")
    n = len(table) if limit is None else min(limit, len(table))
    samples = [table.sample(i)[0] for i in range(n)]
    prompts = [s[:p].tolist() for s, p in zip(samples, prompt_lens[:n])]
    stored = [s[p:].tolist() for s, p in zip(samples, prompt_lens[:n])]
    rows, served = [], {}
    for name, path in drafters.items():
        got = vllm_tau(target, path, prompts, [len(c) for c in stored], k, enforce_eager)
        served[name] = got.pop("outputs")
        rows.append({"drafter": name, "path": str(path), "vllm_tau": got["tau"],
                     "vllm_per_position": got["per_position"], "vllm_drafts": got["drafts"],
                     "identical_to_stored": sum(o == c for o, c in zip(served[name], stored))})
    offline = offline_taus(target, drafters, prompts, stored, served, k)
    for row in rows:
        row.update(offline[row["drafter"]])
        row["relative_gap"] = (row["offline_tau"] - row["vllm_tau"]) / row["vllm_tau"]
        row["relative_gap_same_text"] = ((row["offline_tau_on_vllm_outputs"] - row["vllm_tau"])
                                         / row["vllm_tau"])
        print(json.dumps({k_: row[k_] for k_ in (
            "drafter", "offline_tau", "offline_tau_on_vllm_outputs", "vllm_tau",
            "relative_gap", "identical_to_stored")}), flush=True)
    import vllm
    result = {"device": device_name(), "vllm_version": vllm.__version__, "k": k,
              "temperature": 0.0, "prompts": n, "data": str(data),
              "enforce_eager": enforce_eager, "rows": rows}
    if out_json:
        Path(out_json).write_text(json.dumps(result, indent=2) + "\n")
    return result
