"""Offline, CPU: how often the target's next token (and the drafter's own dense-head top-1)
lies inside the groups each head mode scores, for the shipped SmolLM2 drafter: the static
set (first k groups), the router's per-token top k, and the batch-shared set at batch
sizes 1, 8 and 32 (`head/shared_lm_head.py`). Coverage, not acceptance: a draft can be
in the set and still wrong. Positions: the target's greedy replies to the smoke prompts.

    python scripts/group_coverage.py [--out benchmarks/results/group_coverage_smollm2.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from coral_vllm.bench.smoke_prompts import SMOKE_PROMPTS
from coral_vllm.data.target import load_target, target_features
from coral_vllm.head.router import top_groups
from coral_vllm.head.shared_lm_head import shared_groups
from coral_vllm.model_store.drafters import shipped_drafter
from coral_vllm.model_store.targets import fetch_model
from coral_vllm.training.evaluate import load_drafter

BATCHES, SHUFFLES, NEW_TOKENS = (1, 8, 32), 5, 96


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/group_coverage_smollm2.json")
    out = ap.parse_args().out
    torch.manual_seed(0)
    target, tok, _ = load_target(fetch_model(), "cpu")
    drafter = load_drafter(shipped_drafter(), target).eval()
    c = drafter.coral
    group_of = torch.empty(c.vocab_size, dtype=torch.long)
    group_of[drafter.partition.token_order] = torch.arange(c.vocab_size) // c.group_size
    feats, nexts = [], []
    with torch.no_grad():
        for p in SMOKE_PROMPTS:
            ids = tok.apply_chat_template([{"role": "user", "content": p}],
                                          add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True)["input_ids"]
            ids = target.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
            f = target_features(target, ids)
            logits = target(ids).logits[0]
            h = drafter(ids[:, 1:], f[:, :-1])[0]          # h_t predicts token t + 2
            feats.append(h[:-1])
            nexts.append(logits[1:-1].argmax(-1))          # the target's top-1 there
        h, nxt = torch.cat(feats), torch.cat(nexts)
        router = drafter.router(h)
        dense = (h @ drafter.lm_head.weight.T.to(h.dtype)).argmax(-1)
    k, pinned = c.top_k_groups, c.pinned_groups

    def inside(sets: torch.Tensor, idx: torch.Tensor) -> dict[str, float]:
        hit = lambda toks: (sets == group_of[toks[idx]].unsqueeze(1)).any(1).float().mean()  # noqa: E731
        return {"target_top1": round(hit(nxt).item(), 4), "dense_top1": round(hit(dense).item(), 4)}

    every = torch.arange(len(nxt))
    rows = {"static": inside(torch.arange(k).expand(len(nxt), k), every),
            "per_token": inside(top_groups(router, k, pinned), every)}
    for n in BATCHES:
        runs = []
        for _ in range(SHUFFLES):  # batches of n positions drawn at random from all replies
            perm = torch.randperm(len(nxt))[: (len(nxt) // n) * n]
            sets = torch.empty(len(nxt), k, dtype=torch.long)
            for s in range(0, len(perm), n):
                sets[perm[s:s + n]] = shared_groups(router[perm[s:s + n]], k, pinned)
            runs.append(inside(sets[perm], perm))
        rows[f"batch_shared_n{n}"] = {key: round(sum(r[key] for r in runs) / SHUFFLES, 4)
                                      for key in runs[0]}
    result = {"device": "CPU", "drafter": "shipped SmolLM2-135M-Instruct drafter",
              "groups": f"{k}/{c.num_groups}", "positions": len(nxt),
              "data": f"target's greedy replies ({NEW_TOKENS} new tokens) to the "
                      f"{len(SMOKE_PROMPTS)} smoke prompts",
              "measures": "share of positions whose token's group is in the scored set "
                          "(coverage, not acceptance)",
              "shuffles_per_batch_size": SHUFFLES, "rows": rows}
    with open(out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
