"""The static draft-vocabulary head equals the dense head on the most frequent rows; the
`selection` setting that asks for it is checked."""

from __future__ import annotations

import pytest
import torch

from coral_vllm.format.checkpoint import expected_shapes
from coral_vllm.format.config import CoralConfig, CoralConfigError
from coral_vllm.format.drafter_config import FUSED_ARCHITECTURE
from coral_vllm.format.partition import build_token_order, grouped_rows, row_token_ids
from coral_vllm.head.grouped_lm_head import grouped_logits_torch, scatter_to_vocab
from coral_vllm.head.router import select_groups
from coral_vllm.head.static_lm_head import static_logits, static_top1


@pytest.mark.parametrize("vocab,groups,k,n", [(1000, 7, 2, 3), (1001, 10, 10, 2),
                                              (512, 8, 1, 1)])
def test_static_head_is_the_dense_head_on_the_most_frequent_rows(vocab, groups, k, n):
    """A static drafter's head, greedy and full-vocabulary, equals the dense head
    restricted to the k*G most frequent tokens, which are also what the offline
    evaluators' group selection (the first k groups) activates."""
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
