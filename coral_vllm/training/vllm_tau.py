"""Does the offline tau predict serving? Both on the same dev prompts, same drafters.

For every drafter: the offline chain tau that training selects checkpoints by
(validate.chain_tau over the dev continuations stored in the data directory, with the
head the drafter serves with: the router's groups if it activates fewer than all), and
the tau vLLM's own counters give when it serves the same prompts with `method: coral`,
greedy, k draft tokens, each request asking for as many tokens as its stored
continuation has. vLLM's replies are compared with the stored continuations too: they
are the same tokens unless bf16 near-ties flip between the two engines.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from coral_vllm.training.data import load_dev


def vllm_tau(target: str, drafter: str, prompts: list[list[int]], max_tokens: list[int],
             k: int, enforce_eager: bool) -> dict[str, Any]:
    """vLLM's tau and outputs for one drafter (one offline engine)."""
    from vllm import SamplingParams, TokensPrompt

    from coral_vllm.runtime.metrics import from_llm_metrics
    from coral_vllm.runtime.offline_engine import offline_engine

    spec = {"method": "coral", "model": str(drafter), "num_speculative_tokens": k}
    with offline_engine(target, spec, max_model_len=4096, disable_log_stats=False,
                        enforce_eager=enforce_eager,
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


def offline_rows(target: str, table, prompt_lens: np.ndarray, drafters: dict[str, str],
                 k: int) -> list[dict[str, Any]]:
    """Offline chain tau per drafter, with the head it serves with."""
    import torch

    from coral_vllm.training.evaluate import load_drafter, tau_of_drafters
    from coral_vllm.training.features import compute_features
    from coral_vllm.training.target import load_target
    from coral_vllm.training.validate import EvalSplit

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _, _ = load_target(target, dev)
    split = EvalSplit(table, compute_features(model, table, dev), prompt_lens)
    rows = []
    for name, path in drafters.items():
        drafter = load_drafter(path, model, dev)
        routed = drafter.coral.top_k_groups < drafter.coral.num_groups  # type: ignore[attr-defined]
        offline = {r["router"]: r for r in tau_of_drafters(model, {name: drafter}, split, k=k)}
        rows.append({"drafter": name, "path": str(path), "router": routed,
                     "offline_tau": offline[routed]["tau"],
                     "offline_rounds": offline[routed]["rounds"]})
    return rows


def compare(target: str, data: str, drafters: dict[str, str], *, k: int = 5,
            limit: int | None = None, enforce_eager: bool = True,
            out_json: str | None = None) -> dict[str, Any]:
    """Offline vs vLLM tau per drafter on the data directory's dev prompts."""
    import gc

    import torch

    from coral_vllm.bench.results import device_name

    table, prompt_lens = load_dev(data, 1 << 20)
    if table is None:
        raise ValueError(f"{data}: no dev prompts (data made before dev splits existed)")
    n = len(table) if limit is None else min(limit, len(table))
    table, prompt_lens = table.subset(np.arange(n)), prompt_lens[:n]
    samples = [table.sample(i)[0] for i in range(n)]
    prompts = [s[:p].tolist() for s, p in zip(samples, prompt_lens)]
    conts = [s[p:].tolist() for s, p in zip(samples, prompt_lens)]
    rows = offline_rows(target, table, prompt_lens, drafters, k)
    gc.collect()  # the target and features go before vLLM measures free memory
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    for row in rows:
        got = vllm_tau(target, row["path"], prompts, [len(c) for c in conts], k, enforce_eager)
        same = sum(o == c for o, c in zip(got.pop("outputs"), conts))
        row.update(vllm_tau=got["tau"], vllm_per_position=got["per_position"],
                   vllm_drafts=got["drafts"], identical_to_stored=same,
                   relative_gap=(row["offline_tau"] - got["tau"]) / got["tau"])
        print(json.dumps({k_: row[k_] for k_ in ("drafter", "offline_tau", "vllm_tau",
                                                 "relative_gap", "identical_to_stored")}),
              flush=True)
    import vllm
    result = {"device": device_name(), "vllm_version": vllm.__version__, "k": k,
              "temperature": 0.0, "prompts": n, "data": str(data),
              "enforce_eager": enforce_eager, "rows": rows}
    if out_json:
        Path(out_json).write_text(json.dumps(result, indent=2) + "\n")
    return result
