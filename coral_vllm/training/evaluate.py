"""Offline mean acceptance length tau of exported drafters (chain drafting, greedy).

`run_eval` (the `train eval` command) lets the target write its greedy continuation of
each benchmark prompt, then replays every round of chain drafting over it in one batched
pass (validate.chain_tau). `speculative_generate` is the plain reference that chain_tau
is tested against: round by round, the drafter proposes k tokens in a chain (its own
output feature feeds the next step, as in vLLM), the target verifies them with one full
forward (no KV cache: simple, exact, slow), and the round yields the accepted prefix
plus the target's own next token, so tau = mean(accepted + 1). With the router on, each
draft token is the top-1 over the router's `top_k_groups` groups only, its pinned groups
included (`head.router.top_groups`, `coral_vllm.head.grouped_lm_head`); off, over the
whole vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors.torch import load_file

from coral_vllm.format.checkpoint import WEIGHTS_FILE, read_checkpoint
from coral_vllm.head.grouped_lm_head import grouped_top1
from coral_vllm.format.partition import grouped_rows, row_token_ids
from coral_vllm.head.router import select_groups
from coral_vllm.data.batches import TokenTable
from coral_vllm.data.feature_store import compute_features
from coral_vllm.training.model import CoralDrafter, build_drafter
from coral_vllm.data.target import load_target, pick_device, target_features
from coral_vllm.training.multi_step import multi_step_forward
from coral_vllm.training.validate import DraftTop1, EvalSplit, chain_tau


def load_drafter(path: str | Path, target_model, device=None,
                 dtype: torch.dtype | None = None) -> CoralDrafter:
    """An exported drafter directory as a CoralDrafter (heads from the target if absent).

    The drafter runs in `dtype`, by default the target's parameter dtype (bf16 on a GPU,
    float32 on the CPU), as vLLM runs it; callers cast the target's features to
    `drafter_dtype(drafter)` at the boundary and score the head in float32 (DraftHead).
    A static drafter gets `router = None`: "router on" then means its first
    `top_k_groups` groups, as it serves.
    """
    ckpt = read_checkpoint(path)
    tensors = load_file(str(Path(path) / WEIGHTS_FILE))
    drafter = build_drafter(ckpt.config, ckpt.coral.num_groups, ckpt.coral.router_act,
                            tensors, target_model, device, dtype,
                            selection=ckpt.coral.selection)
    drafter.coral = ckpt.coral  # type: ignore[attr-defined]
    return drafter


def require_eagle_features(drafter: CoralDrafter) -> None:
    """Token-by-token speculation here feeds the drafter's outputs back as target
    features, which only an EAGLE drafter reads; a fused one hands on another state."""
    if drafter.fused_layers is not None:
        raise NotImplementedError(
            f"drafter reads fused target layers {drafter.fused_layers}: speculative_"
            "generate replays EAGLE drafters only; use tau_of_drafters (`train eval`, "
            "`vllm-tau`), which replays chains the way vLLM drafts them.")


def with_drafter_features(split: EvalSplit, target, drafter: CoralDrafter) -> EvalSplit:
    """`split` (the target's last hidden states) with the features `drafter` reads: the
    same split for EAGLE; recomputed with the fused layers for an EAGLE-3-style one."""
    if drafter.fused_layers is None:
        return split
    dev = next(target.parameters()).device
    return EvalSplit(split.table, compute_features(target, split.table, dev,
                                                   fused_layers=drafter.fused_layers),
                     split.prompt_lens)


def drafter_dtype(drafter: CoralDrafter) -> torch.dtype:
    """The dtype the drafter's fc / layer compute in (target features are cast to it)."""
    return drafter.fc.weight.dtype


class DraftHead:
    """Top-1 of the drafter's head: dense, or restricted to the router's groups (a static
    drafter's first groups)."""

    def __init__(self, drafter: CoralDrafter, use_router: bool) -> None:
        self.drafter, self.use_router = drafter, use_router
        # the head in float32 whatever the drafter's dtype (h is cast up to meet it)
        self.head = drafter.lm_head.weight.float()
        if use_router:
            c = drafter.coral  # type: ignore[attr-defined]
            order = drafter.partition.token_order
            self.k, self.pinned, self.G = c.top_k_groups, c.pinned_groups, c.group_size
            self.weight = grouped_rows(self.head, order, c.num_groups, c.group_size)
            self.rows = row_token_ids(order, c.num_groups, c.group_size).to(order.device)

    def __call__(self, h: torch.Tensor) -> int:
        h = h.reshape(1, -1)
        if not self.use_router:
            return int((h.float() @ self.head.T).argmax(-1))
        groups = select_groups(self.drafter.router, h, self.k, self.pinned)
        h = h.float()
        return int(grouped_top1(h, self.weight, self.rows, groups, self.G)[1])


@torch.no_grad()
def speculative_generate(target, drafter: CoralDrafter, prompt_ids: Sequence[int], *,
                         k: int = 5, max_new_tokens: int = 128, use_router: bool = False,
                         eos_ids: Sequence[int] = ()) -> dict[str, Any]:
    """Greedy chain speculation; returns the tokens and each round's accepted length."""
    require_eagle_features(drafter)
    dev = next(target.parameters()).device
    head = DraftHead(drafter, use_router)
    eos = set(eos_ids)
    lm_head = target.get_output_embeddings()
    seq = list(prompt_ids)
    feats = target_features(target, torch.tensor([seq], device=dev))[0]
    nxt = int(lm_head(feats[-1]).argmax())
    out, rounds = [nxt], []
    while len(out) < max_new_tokens and nxt not in eos:
        # target features -> the drafter's dtype (they differ if the two were loaded apart)
        ids_in, f_in, drafts = seq[1:] + [nxt], feats.to(drafter_dtype(drafter)), []
        for _ in range(k):
            h = drafter(torch.tensor([ids_in], device=dev), f_in[None])[0, -1]
            tok = head(h)
            drafts.append(tok)
            ids_in, f_in = ids_in + [tok], torch.cat([f_in, h[None]])
        full = seq + [nxt] + drafts
        f = target_features(target, torch.tensor([full], device=dev))[0]
        pred = lm_head(f[len(seq):]).argmax(-1).tolist()  # after nxt, d1, ..., dk
        a = 0
        while a < k and drafts[a] == pred[a]:
            a += 1
        rounds.append(a + 1)
        seq = seq + [nxt] + drafts[:a]
        feats = f[: len(seq)]
        new = drafts[:a] + [pred[a]]
        for t in new:
            out.append(t)
            if t in eos:
                break
        nxt = out[-1]
    return {"tokens": out[:max_new_tokens], "accept_lengths": rounds}


def tau_of_drafters(target, drafters: dict[str, CoralDrafter], split: EvalSplit, *,
                    k: int = 5, modes: Sequence[bool] = (False, True)) -> list[dict[str, Any]]:
    """Offline chain tau (validate.chain_tau) of each exported drafter on one split."""
    dev = next(target.parameters()).device
    results = []
    feature_splits: dict[tuple[int, ...] | None, EvalSplit] = {}  # one target pass per input
    for name, drafter in drafters.items():
        reads = None if drafter.fused_layers is None else tuple(drafter.fused_layers)
        if reads not in feature_splits:
            feature_splits[reads] = with_drafter_features(split, target, drafter)
        drafter_split = feature_splits[reads]
        c = drafter.coral  # type: ignore[attr-defined]
        top1 = DraftTop1(drafter.lm_head.weight, drafter.partition.token_order, c)
        fwd = lambda ids, f, n: multi_step_forward(  # noqa: E731
            drafter, ids, f.to(drafter_dtype(drafter)), n, True)
        r = chain_tau(fwd, drafter_split, top1, drafter.router, k, dev, autocast=False)
        for use_router in modes:
            key = "tau_router" if use_router else "tau_dense"
            results.append({"drafter": name, "router": use_router, "k": k, "tau": r[key],
                            "rounds": r[key + "_rounds"], "prompts": len(split.table)})
    return results


def continuation_split(target, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                       eos_ids: Sequence[int]) -> EvalSplit:
    """Prompts + the target's greedy continuations, with features (what chain_tau replays)."""
    from coral_vllm.data.generators import generate_hf

    conts = generate_hf(target, [list(p) for p in prompts], max_new_tokens, 0.0,
                        list(eos_ids), batch_size=8)
    samples = [(np.array(list(p) + c), np.r_[np.zeros(len(p)), np.ones(len(c))])
               for p, c in zip(prompts, conts)]
    table = TokenTable.from_samples(samples, max(len(s[0]) for s in samples))
    dev = next(target.parameters()).device
    return EvalSplit(table, compute_features(target, table, dev),
                     np.array([len(p) for p in prompts]))


def run_eval(target_path: str, drafters: Sequence[str], benchmarks: Sequence[str], *,
             router: str = "both", k: int = 5, max_new_tokens: int = 128,
             limit: int | None = None, device: str | None = None,
             out_json: str | None = None) -> list[dict[str, Any]]:
    """The `train eval` command: offline tau for every drafter x benchmark x router
    setting, on the target's own greedy continuations (transformers generate)."""
    from coral_vllm.data.eval_sets import benchmark_prompts

    dev = pick_device(device)
    target, tok, _ = load_target(target_path, dev)
    eos = target.generation_config.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    modes = {"on": [True], "off": [False], "both": [False, True]}[router]
    loaded = {str(p): load_drafter(p, target, dev) for p in drafters}
    results = []
    for bench in benchmarks:
        split = continuation_split(target, benchmark_prompts(bench, tok, limit),
                                   max_new_tokens, eos_ids)
        for r in tau_of_drafters(target, loaded, split, k=k, modes=modes):
            r["benchmark"] = bench
            print(json.dumps(r))
            results.append(r)
    if out_json:
        Path(out_json).write_text(json.dumps(results, indent=2) + "\n")
    return results
