"""The PyTorch grouped head equals the dense head restricted to the active groups."""

from __future__ import annotations

import pytest
import torch

from coral_vllm.format.config import CoralConfig
from coral_vllm.format.grouped_head import (grouped_logits_torch, grouped_top1, scatter_to_vocab)
from coral_vllm.format.partition import build_token_order, grouped_rows, row_token_ids
from coral_vllm.format.router import Router


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
    from coral_vllm.format.grouped_head import grouped_layout_problem

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


@pytest.mark.parametrize("vocab,groups,k,n", [(1000, 7, 2, 3), (1001, 10, 10, 2),
                                              (512, 8, 1, 1)])
def test_static_head_is_the_dense_head_on_the_most_frequent_rows(vocab, groups, k, n):
    """A static drafter's head, greedy and full-vocabulary, equals the dense head
    restricted to the k*G most frequent tokens, which are also what the offline
    evaluators' group selection (the first k groups) activates."""
    from coral_vllm.format.router import select_groups
    from coral_vllm.format.static_head import static_logits, static_top1

    g = torch.Generator().manual_seed(vocab + k)
    cfg = CoralConfig.for_vocab(vocab, 24, groups, k, partition="frequency",
                                selection="static")
    weight = torch.randn(vocab, 24, generator=g, dtype=torch.float64)
    counts = torch.randint(0, 50, (vocab,), generator=g)
    order = build_token_order("frequency", vocab, groups, token_counts=counts)
    gw, rows = grouped_rows(weight, order, groups, cfg.group_size), row_token_ids(
        order, groups, cfg.group_size)
    h = torch.randn(n, 24, generator=g, dtype=torch.float64)
    frequent = torch.sort(-counts.double(), stable=True).indices[: cfg.active_rows]
    member = torch.zeros(vocab, dtype=torch.bool)
    member[frequent] = True
    expected = (h @ weight.T).float().masked_fill(~member, float("-inf")) * 0.5

    full = static_logits(h, gw, rows, cfg.active_rows, vocab, scale=0.5)
    torch.testing.assert_close(full, expected)
    values, top = static_top1(h, gw, rows, cfg.active_rows, scale=0.5)
    assert torch.equal(top, expected.argmax(-1))
    torch.testing.assert_close(values, expected.max(-1).values)
    ids = select_groups(None, h, k)
    logits, tokens = grouped_logits_torch(h, gw, rows, ids, cfg.group_size, scale=0.5)
    torch.testing.assert_close(scatter_to_vocab(logits, tokens, vocab), expected)


def test_selection_setting_is_checked_and_old_drafters_read_as_routed():
    from coral_vllm.format.checkpoint import expected_shapes
    from coral_vllm.format.config import CoralConfigError
    from coral_vllm.format.drafter_config import FUSED_ARCHITECTURE

    routed = CoralConfig.for_vocab(1000, 16, 8, 2, partition="cluster")
    old = {k: v for k, v in routed.to_dict().items() if k != "selection"}
    assert CoralConfig.from_dict(old).selection == "router"
    with pytest.raises(CoralConfigError, match=r'"coral.selection": is \'dense\'; choose'):
        CoralConfig.for_vocab(1000, 16, 8, 2, selection="dense")
    with pytest.raises(CoralConfigError, match='needs "partition": "frequency"'):
        CoralConfig.for_vocab(1000, 16, 8, 2, partition="cluster", selection="static")
    static = CoralConfig.for_vocab(128256, 16, 64, 8, selection="static")
    assert static.with_active_rows(32768).top_k_groups == 16  # 16 x 2004 = 32064 rows
    assert static.with_active_rows(32768).active_rows == 32064
    llama = {"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32,
             "num_hidden_layers": 1}
    assert not any(k.startswith("router.") for k in expected_shapes(llama, static))
    assert "router.w2.weight" in expected_shapes(llama, routed)
    # depth and fused target layers leave the router's tensors to the selection
    deep_fused = dict(llama, num_hidden_layers=2, architectures=[FUSED_ARCHITECTURE],
                      eagle_aux_hidden_state_layer_ids=[1, 2, 3])
    shapes = expected_shapes(deep_fused, static)
    assert not any(k.startswith("router.") for k in shapes)
    assert shapes["fc.weight"] == (16, 48) and "layers.1.input_layernorm.weight" in shapes
    assert "router.w2.weight" in expected_shapes(deep_fused, routed)
