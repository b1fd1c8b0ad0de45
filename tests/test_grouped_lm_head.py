"""The PyTorch grouped head equals the dense head restricted to the active groups."""

from __future__ import annotations

import pytest
import torch

from coral_vllm.format.config import CoralConfig
from coral_vllm.format.partition import build_token_order, grouped_rows, row_token_ids
from coral_vllm.head.grouped_lm_head import grouped_logits_torch, grouped_top1, scatter_to_vocab
from coral_vllm.head.router import Router


def _setup(vocab: int, d: int, groups: int, k: int, strategy: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    cfg = CoralConfig.for_vocab(vocab, d, groups, k)
    weight = torch.randn(vocab, d, generator=g, dtype=torch.float64)
    order = build_token_order(strategy, vocab, groups, lm_head=weight,
                              token_counts=torch.rand(vocab, generator=g))
    return (cfg, weight, grouped_rows(weight, order, groups, cfg.group_size),
            row_token_ids(order, groups, cfg.group_size))


@pytest.mark.parametrize("strategy", ["contiguous", "frequency", "cluster"])
@pytest.mark.parametrize("vocab,groups,k,n", [(1000, 7, 2, 1), (1000, 7, 2, 5),
                                              (512, 8, 3, 4), (257, 16, 16, 2)])
def test_grouped_equals_dense_restricted(strategy, vocab, groups, k, n):
    cfg, weight, gw, rows = _setup(vocab, 24, groups, k, strategy, seed=vocab + n)
    h = torch.randn(n, 24, dtype=torch.float64)
    group_ids = Router(24, groups, dtype=torch.float64).select(h, k)
    logits, tokens = grouped_logits_torch(h, gw, rows, group_ids, cfg.group_size)
    full = scatter_to_vocab(logits, tokens, vocab)
    dense = (h @ weight.T).float()
    # the active set is exactly the union of the chosen groups' tokens
    member = torch.zeros(n, vocab, dtype=torch.bool)
    for i in range(n):
        for gid in group_ids[i].tolist():
            toks = rows[gid * cfg.group_size:(gid + 1) * cfg.group_size]
            member[i, toks[toks >= 0]] = True
    assert torch.equal(torch.isfinite(full), member)
    torch.testing.assert_close(full[member], dense[member], rtol=1e-5, atol=1e-5)
    assert torch.all(full[~member] == float("-inf"))
    # the top-token path equals argmax of the logits
    values, top = grouped_top1(h, gw, rows, group_ids, cfg.group_size)
    assert torch.equal(top, full.argmax(dim=-1))
    torch.testing.assert_close(values, full.max(dim=-1).values)


def test_both_strategies_agree_and_scale():
    """Per-token gather (n*k < groups) and score-all-then-pick give the same numbers."""
    cfg, weight, gw, rows = _setup(900, 16, 30, 4, "cluster", seed=3)
    h = torch.randn(12, 16, dtype=torch.float64)  # 12*4 >= 30 -> score-all path
    ids = torch.randint(0, 30, (12, 4))
    all_path, t1 = grouped_logits_torch(h, gw, rows, ids, cfg.group_size, scale=0.5)
    per_tok = [grouped_logits_torch(h[i:i + 1], gw, rows, ids[i:i + 1], cfg.group_size,
                                    scale=0.5) for i in range(12)]
    torch.testing.assert_close(all_path, torch.cat([p[0] for p in per_tok]))
    assert torch.equal(t1, torch.cat([p[1] for p in per_tok]))


def test_ragged_last_group_padding_is_minus_inf():
    cfg, _, gw, rows = _setup(1001, 8, 10, 1, "contiguous", seed=4)
    assert cfg.padded_vocab > 1001
    last = torch.full((1, 1), cfg.num_groups - 1)
    logits, tokens = grouped_logits_torch(torch.randn(1, 8, dtype=torch.float64), gw, rows,
                                          last, cfg.group_size)
    pad = tokens < 0
    assert pad.sum() == cfg.padded_vocab - 1001
    assert torch.all(logits[pad] == float("-inf")) and torch.all(torch.isfinite(logits[~pad]))



def test_layout_check_accepts_the_grouped_copy_and_names_a_stale_one():
    """The load-time check: the copy in partition order passes; an unfilled copy, one
    made from a head that has changed since, and a copy of an all-zero head are named."""
    from coral_vllm.head.grouped_lm_head import grouped_layout_problem

    _, weight, gw, rows = _setup(1000, 24, 7, 2, "cluster", seed=3)
    order = rows[:1000]
    assert grouped_layout_problem(gw, weight, order, chunk_rows=300) is None
    assert "rows 0..299 differ" in grouped_layout_problem(torch.zeros_like(gw), weight,
                                                          order, chunk_rows=300)
    changed = weight.clone()
    changed[order[700]] += 1
    assert "rows 600..899 differ" in grouped_layout_problem(gw, changed, order,
                                                            chunk_rows=300)
    assert "all zeros" in grouped_layout_problem(gw, torch.zeros_like(weight), order)
