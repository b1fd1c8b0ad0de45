"""Batch-shared groups (PyTorch): which groups the batch shares, and that its head is the
dense head restricted to them."""

from __future__ import annotations

import pytest
import torch

from coral_vllm.format.checkpoint import read_checkpoint
from coral_vllm.format.config import CoralConfig, CoralConfigError
from coral_vllm.head.grouped_lm_head import scatter_to_vocab
from coral_vllm.head.router import Router
from coral_vllm.head.shared_lm_head import shared_groups, shared_logits_torch, shared_top1
from test_grouped_lm_head import _setup


def test_one_token_shares_its_own_top_k():
    """n = 1: the shared set is the per-token candidate set."""
    logits = torch.randn(1, 64, generator=torch.Generator().manual_seed(0))
    assert set(shared_groups(logits, 8).tolist()) == set(logits.topk(8).indices[0].tolist())


def test_every_tokens_best_group_is_in_then_the_best_liked():
    """Each token's argmax group is shared, even a weak one, ahead of groups another token
    likes more; the remaining slots go to the highest probability any token gives."""
    logits = torch.full((3, 10), -5.0)
    logits[0, :3] = torch.tensor([9.0, 8.9, 8.8])       # p ~ .37 .33 .30
    logits[2] = logits[0]
    logits[1] = 0.0
    logits[1, 5] = 0.5                                   # a weak argmax: p5 ~ .15
    assert set(shared_groups(logits, 2).tolist()) == {0, 5}
    assert set(shared_groups(logits, 4).tolist()) == {0, 5, 1, 2}
    # more best groups than slots: the most probable one wins
    assert shared_groups(logits, 1).tolist() == [0]


@pytest.mark.parametrize("n,U", [(1, 2), (5, 3), (12, 4)])
def test_shared_equals_dense_restricted(n, U):
    cfg, weight, gw, rows = _setup(1000, 24, 7, U, "cluster", seed=n)
    h = torch.randn(n, 24, dtype=torch.float64)
    groups = shared_groups(Router(24, 7, dtype=torch.float64)(h), U)
    logits, tokens = shared_logits_torch(h, gw, rows, groups, cfg.group_size, 0.5)
    full = scatter_to_vocab(logits, tokens.expand(n, -1), 1000)
    member = torch.zeros(1000, dtype=torch.bool)
    for g in groups.tolist():
        toks = rows[g * cfg.group_size:(g + 1) * cfg.group_size]
        member[toks[toks >= 0]] = True
    member = member.expand(n, -1)
    assert torch.equal(torch.isfinite(full), member)          # the last group's padding too
    torch.testing.assert_close(full[member], (0.5 * h @ weight.T).float()[member])
    values, top = shared_top1(h, gw, rows, groups, cfg.group_size, 0.5)
    assert torch.equal(top, full.argmax(dim=-1))
    torch.testing.assert_close(values, full.max(dim=-1).values)


def test_group_sharing_is_validated():
    cfg = CoralConfig.for_vocab(1000, 24, 8, 2)
    assert cfg.group_sharing == "token"
    assert CoralConfig.from_dict({**cfg.to_dict(), "group_sharing": "batch"}).group_sharing \
        == "batch"
    with pytest.raises(CoralConfigError, match=r'"coral.group_sharing".*\(\'token\', \'batch\'\)'):
        CoralConfig.from_dict({**cfg.to_dict(), "group_sharing": "step"})


@pytest.mark.engine
def test_engine_serves_the_batch_shared_head(runs, drafters):
    """Served through vLLM, one batch of features gets one set of active rows: every
    token's draft logits are finite on the same active_rows rows, and greedy drafting
    (`get_top_tokens`) picks their argmax."""
    c = read_checkpoint(drafters.drafter("shared")).coral
    head = runs.greedy("shared")["head"]
    assert c.group_sharing == "batch" and head["shares_head"]
    assert head["top"] == head["argmax"]
    assert set(head["rows"]) == {c.active_rows} and head["common_rows"] == c.active_rows
