"""Validation that predicts serving: held-out accuracy per HASS step and offline chain tau.

**Offline chain tau, exactly, in one batched forward.** Greedy speculative decoding is
lossless, so the tokens it produces are the target's own greedy continuation y of the
prompt, known in advance (the data builder stores y for every dev prompt). A round of
chain drafting that starts after position u reads target features up to u and then its
own outputs; its depth-j draft is what HASS's context-aligned multi-step forward computes
at position u + j - 1 in step j (`trainer.multi_step_forward`, checked against a
token-by-token chain in the tests). A draft only matters while every shallower draft of
its round matched y, and then its inputs are y's tokens, so one teacher-forced k-step
forward over prompt + y yields every draft any round would make. A scan over the
match table replays the rounds (accept the matching prefix, add the bonus token, start
the next round after it) and gives tau = mean(accepted + 1), what vLLM's counters give
as 1 + accepted / drafts, with the router's restricted head or the dense one.

**Held-out accuracy** is the teacher-forced top-1 agreement with the target at each HASS
step on samples of the training distribution that training never sees.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from coral_vllm.format.config import CoralConfig
from coral_vllm.head.grouped_lm_head import grouped_logits_torch
from coral_vllm.format.partition import grouped_rows, row_token_ids
from coral_vllm.head.router import select_groups
from coral_vllm.data.target import split_features
from coral_vllm.data.batches import Batch, TokenTable, epoch_batches
from coral_vllm.training.losses import default_chunk

EVAL_BATCH_TOKENS = 1 << 15


@dataclasses.dataclass
class EvalSplit:
    """A table, its target features and (dev) the prompt length of each sample."""
    table: TokenTable
    feats: torch.Tensor
    prompt_lens: np.ndarray | None = None


class DraftTop1:
    """Top-1 tokens of drafter features: dense head, and the router's groups only, as
    `coral` serves them (its pinned groups included; the first k groups when `router`
    is None: a static drafter)."""

    def __init__(self, head: torch.Tensor, token_order: torch.Tensor,
                 coral: CoralConfig) -> None:
        self.head = head
        self.k, self.pinned = coral.top_k_groups, coral.pinned_groups
        self.group_size = coral.group_size
        self.grouped = grouped_rows(head, token_order, coral.num_groups, coral.group_size)
        self.rows = row_token_ids(token_order, coral.num_groups,
                                  coral.group_size).to(head.device)
        self.chunk = default_chunk(head.shape[0])

    @torch.no_grad()
    def __call__(self, h: torch.Tensor, router) -> tuple[torch.Tensor, torch.Tensor]:
        dense, routed = [], []
        for a in range(0, len(h), self.chunk):
            c = h[a:a + self.chunk]
            dense.append((c.to(self.head.dtype) @ self.head.T).float().argmax(-1))
            groups = select_groups(router, c, self.k, self.pinned)
            # the plugin's torch reference (the Triton kernel computes the same function)
            logits, tokens = grouped_logits_torch(c, self.grouped, self.rows, groups,
                                                  self.group_size)
            routed.append(tokens.gather(1, logits.argmax(-1, keepdim=True)).squeeze(1))
        return torch.cat(dense), torch.cat(routed)


def _batches(split: EvalSplit, device: torch.device, hidden_size: int):
    """(sample indices, batch, the target's last hidden states, the drafter's input
    features: see `target.split_features`) per evaluation batch."""
    for idx in epoch_batches(split.table.lengths, EVAL_BATCH_TOKENS, seed=0, epoch=0):
        batch = Batch.build(split.table, idx).to(device)
        f = split.feats[batch.rows.to(split.feats.device)].to(device)
        yield (idx, batch, *split_features(f, hidden_size))


@torch.no_grad()
def heldout_accuracy(forward, split: EvalSplit, top1: DraftTop1, router,
                     num_steps: int, device: torch.device, autocast: bool) -> dict[str, float]:
    """Teacher-forced top-1 agreement with the target per step (dense) and at step 1
    with the router's groups only."""
    hits = torch.zeros(num_steps + 1, dtype=torch.int64, device=device)
    total = 0
    for _, batch, last, feats in _batches(split, device, top1.head.shape[1]):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            outs = forward(batch.ids_in, feats[:, :-1], num_steps)
        want = last[:, 1:].flatten(0, 1)[batch.loss_pos]
        target = (want.to(top1.head.dtype) @ top1.head.T).float().argmax(-1)
        for j, o in enumerate(outs):
            dense, routed = top1(o.flatten(0, 1)[batch.loss_pos], router)
            hits[j] += (dense == target).sum()
            if j == 0:
                hits[num_steps] += (routed == target).sum()
        total += batch.loss_tokens
    rates = (hits.double() / max(1, total)).tolist()
    out = {f"heldout_acc{j + 1}": rates[j] for j in range(num_steps)}
    out["heldout_acc1_router"] = rates[num_steps]
    return out


def replay_rounds(match: np.ndarray, start: int, end: int) -> tuple[int, int]:
    """(rounds, accepted drafts) of greedy chain drafting over one sequence.

    match[t, j]: the step-(j+1) draft at position t equals token t + 2. The first round
    starts at `start` (the last prompt position: the first new token came from prefill),
    and rounds go on until position `end` (the last token) is produced.
    """
    k = match.shape[1]
    rounds = accepted = 0
    u = start
    while u + 1 < end:
        a = 0
        while a < k and u + a < len(match) and match[u + a, a]:
            a += 1
        rounds += 1
        accepted += a
        u += a + 1
    return rounds, accepted


@torch.no_grad()
def chain_tau(forward, split: EvalSplit, top1: DraftTop1, router, k: int,
              device: torch.device, autocast: bool) -> dict[str, float]:
    """Offline mean acceptance length at chain length k, dense head and router on."""
    assert split.prompt_lens is not None, "chain tau needs the dev split's prompt lengths"
    tables = {"tau_dense": [0, 0], "tau_router": [0, 0]}  # rounds, accepted
    for idx, batch, _, feats in _batches(split, device, top1.head.shape[1]):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            outs = forward(batch.ids_in, feats[:, :-1], k)
        b, s1 = batch.ids_in.shape
        # token each position's draft is compared with: x_{t+2} (pad rows never match)
        nxt = torch.full((b, s1), -1, dtype=torch.long, device=device)
        nxt[:, :-1] = batch.ids_in[:, 1:]
        pos = batch.loss_pos
        want = nxt.flatten()[pos]
        m = {name: torch.zeros(b * s1, k, dtype=torch.bool, device=device) for name in tables}
        for j, o in enumerate(outs):
            dense, routed = top1(o.flatten(0, 1)[pos], router)
            m["tau_dense"][pos, j] = dense == want
            m["tau_router"][pos, j] = routed == want
        for name, mt in m.items():
            mt = mt.view(b, s1, k).cpu().numpy()
            for row, i in enumerate(idx):
                r, a = replay_rounds(mt[row], int(split.prompt_lens[i]) - 1,
                                     int(split.table.lengths[i]) - 1)
                tables[name][0] += r
                tables[name][1] += a
    out: dict[str, float] = {}
    for name, (r, a) in tables.items():
        out[name] = (r + a) / r if r else 1.0
        out[name + "_rounds"] = r
    return out


def validate(forward, *, heldout: EvalSplit | None, dev: EvalSplit | None, top1: DraftTop1,
             router, num_steps: int, k: int, device: torch.device, autocast: bool
             ) -> dict[str, Any]:
    """Everything the trainer logs at an evaluation step."""
    out: dict[str, Any] = {}
    if heldout is not None and len(heldout.table):
        out.update(heldout_accuracy(forward, heldout, top1, router, num_steps, device,
                                    autocast))
    if dev is not None and len(dev.table):
        out.update(chain_tau(forward, dev, top1, router, k, device, autocast))
    return out
