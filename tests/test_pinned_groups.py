"""Pinned groups: the frequency partition's first p groups always active, the router's
top k - p of the rest (`head.router.top_groups`), in every selection path and in the
router stage's recall and choice."""

from __future__ import annotations

import pytest
import torch

from coral_vllm.format.config import CoralConfig, CoralConfigError
from coral_vllm.head.router import Router, select_groups, top_groups
from coral_vllm.head.shared_lm_head import shared_groups
from coral_vllm.training.router_train import (choose_selection, chosen_selection,
                                              pinned_candidates, recall_at_k)


def _cfg(**kw) -> CoralConfig:
    return CoralConfig.for_vocab(1000, 16, 8, 4, **{"partition": "frequency", **kw})


def test_old_drafters_pin_nothing_and_the_count_round_trips():
    old = {k: v for k, v in _cfg().to_dict().items() if k != "pinned_groups"}
    assert CoralConfig.from_dict(old).pinned_groups == 0
    assert CoralConfig.from_dict(_cfg(pinned_groups=3).to_dict()).pinned_groups == 3


@pytest.mark.parametrize("kw,words", [
    (dict(pinned_groups=4), ["coral.pinned_groups", "is 4", "0 <= pinned_groups < "
                             "top_k_groups = 4", "static"]),
    (dict(pinned_groups=-1), ["coral.pinned_groups", "0 <= pinned_groups"]),
    (dict(pinned_groups=1.0), ["coral.pinned_groups", "integer"]),
    (dict(pinned_groups=True), ["coral.pinned_groups", "integer"]),
    (dict(pinned_groups=2, partition="cluster"),
     ["coral.pinned_groups", '"partition": "frequency"', "'cluster'", '"pinned_groups": 0']),
    (dict(pinned_groups=2, selection="static"),
     ["coral.pinned_groups", "no router", '"pinned_groups": 0']),
])
def test_bad_pinned_counts_name_the_field_and_the_fix(kw, words):
    with pytest.raises(CoralConfigError) as e:
        _cfg(**kw)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


@pytest.mark.parametrize("pinned", [0, 1, 3, 5])
def test_pinned_groups_come_first_then_the_routers_best_of_the_rest(pinned):
    """Shape [n, k] whatever the scores; groups 0..p-1 in the first slots; the rest the
    top k - p of logits[:, p:], so never a group twice; p = 0 is the plain top k."""
    logits = torch.randn(7, 12, generator=torch.Generator().manual_seed(pinned))
    logits[:, :pinned] -= 100  # the router dislikes the pinned groups: still in
    ids = top_groups(logits, 6, pinned)
    assert ids.shape == (7, 6) and ids.dtype == torch.int64
    assert torch.equal(ids[:, :pinned], torch.arange(pinned).expand(7, -1))
    for row, logit in zip(ids, logits):
        assert len(set(row.tolist())) == 6
        assert set(row[pinned:].tolist()) == set((logit[pinned:].topk(6 - pinned).indices
                                                  + pinned).tolist())
    assert set(top_groups(logits, 6)[0].tolist()) == set(logits[0].topk(6).indices.tolist())


def test_router_select_and_select_groups_take_the_pinned_count():
    router = Router(16, 8, dtype=torch.float64)
    h = torch.randn(5, 16, dtype=torch.float64)
    want = top_groups(router(h), 4, 2)
    assert torch.equal(router.select(h, 4, 2), want)
    assert torch.equal(select_groups(router, h.float(), 4, 2), want)


def test_batch_shares_the_pinned_groups_and_its_best_of_the_rest():
    """Groups 0, 1 pinned; token 1's best group (0) is pinned, so the bonus goes to token
    0's best unpinned group 5 and then to the highest probability on the rest (group 3,
    which token 1 likes); at n = 1 the set is the token's own pinned selection."""
    logits = torch.full((2, 8), -5.0)
    logits[0, 5] = 0.0                        # token 0: best group 5 (weakly)
    logits[1, 0], logits[1, 3] = 9.0, 8.0     # token 1: group 0, then group 3
    assert shared_groups(logits, 4, 2).tolist()[:2] == [0, 1]
    assert set(shared_groups(logits, 4, 2).tolist()) == {0, 1, 5, 3}
    assert set(shared_groups(logits, 3, 2).tolist()) == {0, 1, 5}
    one = torch.randn(1, 8, generator=torch.Generator().manual_seed(1))
    assert set(shared_groups(one, 4, 2).tolist()) == set(top_groups(one, 4, 2)[0].tolist())


def test_recall_with_pinned_groups_by_hand():
    """4 groups, k = 2. The router always ranks group 3 then 2 first; the labels are
    groups 0, 0, 3, 1. Plain top 2 = {3, 2} recalls 1 of 4; pinning group 0 gives
    {0, 3}: 3 of 4."""
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).expand(4, -1)
    labels = torch.tensor([0, 0, 3, 1])
    assert recall_at_k(logits, labels, 2) == 0.25
    assert recall_at_k(logits, labels, 2, pinned=1) == 0.75


def test_pinned_candidates_are_quarters_of_k_below_k():
    assert pinned_candidates(16) == [0, 4, 8, 12]
    assert pinned_candidates(8) == [0, 2, 4, 6]
    assert pinned_candidates(2) == [0, 1]
    assert pinned_candidates(1) == [0]


def test_the_choice_is_best_recall_then_fewer_pinned_then_earlier_partition():
    parts = {"contiguous": {"recall_at_k": 0.80, "dense_agreement": 0.7},
             "frequency": {"recall_at_k": 0.85, "dense_agreement": 0.8,
                           "pinned": [{"pinned_groups": 2, "recall_at_k": 0.9,
                                       "dense_agreement": 0.81},
                                      {"pinned_groups": 4, "recall_at_k": 0.9,
                                       "dense_agreement": 0.82}]}}
    assert choose_selection(parts) == {"partition": "frequency", "pinned_groups": 2,
                                       "recall_at_k": 0.9, "dense_agreement": 0.81}
    parts["contiguous"]["recall_at_k"] = 0.9  # a tie with pinned 0 wins
    assert choose_selection(parts)["partition"] == "contiguous"
    # a report written before pinned groups: its partition, nothing pinned
    old = {"chosen": "frequency", "partitions": parts}
    assert chosen_selection(old) == {"partition": "frequency", "pinned_groups": 0,
                                     "recall_at_k": 0.85, "dense_agreement": 0.8}


@pytest.mark.engine
def test_engine_serves_the_pinned_groups(runs, drafters):
    """Served through vLLM (the "pinned" kind: the shipped drafter with 4 of its 8
    groups pinned), the draft logits are the dense head restricted to groups 0..3 plus
    the router's top 4 of groups 4..63 (computed here without `top_groups`), and the
    greedy path drafts their argmax."""
    from transformers import AutoModelForCausalLM

    from coral_vllm.format.partition import group_of_token
    from coral_vllm.training.evaluate import load_drafter
    from drafter_kinds import PINNED
    from kind_probes import ROUNDTRIP_FEATURES

    loaded = runs.greedy("pinned")["loaded"]
    target = AutoModelForCausalLM.from_pretrained(str(drafters.target("smollm2")),
                                                  dtype=torch.float32)
    ref = load_drafter(drafters.drafter("pinned"), target, device="cpu")
    c = ref.coral
    assert (c.pinned_groups, c.top_k_groups, c.partition) == (PINNED, 8, "frequency")
    h = ROUNDTRIP_FEATURES
    with torch.no_grad():
        dense = ref.lm_head(h).float()
        logits = ref.router(h)
    token_group = group_of_token(ref.partition.token_order, c.group_size)
    active = (token_group < PINNED).repeat(len(h), 1)
    for row, order in enumerate(logits[:, PINNED:].argsort(dim=-1, descending=True)):
        active[row] |= torch.isin(token_group, order[: c.top_k_groups - PINNED] + PINNED)
    plain = [set(row.tolist()) for row in logits.topk(c.top_k_groups).indices]
    assert any(not set(range(PINNED)) <= row for row in plain)  # pinning changes groups
    expected = dense.masked_fill(~active, float("-inf"))
    torch.testing.assert_close(loaded["logits"], expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(loaded["top"], expected.argmax(-1))
    assert (torch.isfinite(loaded["logits"]).sum(-1) == c.active_rows).all()
