"""Fused-feature (eagle3) drafters as vLLM builds and feeds them (0.26.0, and 0.32 alike):
fc is sized from `num_aux_hidden_states`, and the target hands out its layers' states
in increasing layer order. Checked against small fakes (no engine, no GPU); where the
unpacked 0.26 sources are present (VLLM026_SRC, default /tmp/vllm026/src), a test also
checks that the fake still says what they say, and skips without them."""

from __future__ import annotations

import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from coral_vllm.format.config import CoralConfig, CoralConfigError
from coral_vllm.format.drafter_config import (FUSED_ARCHITECTURE, FUSED_LAYERS, NUM_FUSED,
                                              check_fused_layers, complete_fused_config,
                                              drafter_llama_config, fused_layers)

SRC = Path(os.environ.get("VLLM026_SRC", "/tmp/vllm026/src")) / "vllm"
TARGET = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
          "num_hidden_layers": 8, "rms_norm_eps": 1e-5}
CORAL = CoralConfig.for_vocab(256, 64, 8, 2)


def _source(rel: str) -> str:
    path = SRC / rel
    if not path.is_file():
        pytest.skip(f"vLLM 0.26.0 sources not unpacked at {SRC}")
    return path.read_text()


# --------------------------------------------------------------- fused layer count

def _vllm_eagle3_fc_inputs(hf_config) -> int:
    """How 0.26 (and 0.32) `llama_eagle3.LlamaModel` counts fc's input states."""
    n = getattr(hf_config, "num_aux_hidden_states", None)
    if n is None:
        ids = (getattr(hf_config, "eagle_config", None) or {}).get(
            "eagle_aux_hidden_state_layer_ids")
        n = len(ids) if ids else 3
    return n


def test_vllm_sizes_fc_from_num_aux_hidden_states_not_the_layer_list():
    src = _source("model_executor/models/llama_eagle3.py")
    assert re.search(r'getattr\(\s*self\.config, "num_aux_hidden_states", None\s*\)', src)
    assert "len(layer_ids) if layer_ids else 3" in src
    assert 'eagle_config.get("eagle_aux_hidden_state_layer_ids")' in src


@pytest.mark.parametrize("layers", [[1, 4], [1, 3, 5, 6], [2, 4, 5]])
def test_a_fused_drafter_over_k_layers_tells_vllm_k(layers):
    cfg = drafter_llama_config(TARGET, CORAL, 1, layers)
    assert cfg["architectures"] == [FUSED_ARCHITECTURE] and cfg[FUSED_LAYERS] == layers
    assert cfg[NUM_FUSED] == len(layers)
    assert _vllm_eagle3_fc_inputs(SimpleNamespace(**cfg)) == len(layers)
    assert fused_layers(cfg) == layers


def test_an_older_fused_export_is_completed_at_load():
    """config.json without the count (exports before it was written): the drafter class
    fills it in, so fc is [d, k*d] and not vLLM's default [d, 3d]."""
    old = SimpleNamespace(**{FUSED_LAYERS: [1, 4]})
    assert _vllm_eagle3_fc_inputs(old) == 3
    complete_fused_config(old)
    assert _vllm_eagle3_fc_inputs(old) == 2
    given = SimpleNamespace(**{FUSED_LAYERS: [1, 4], NUM_FUSED: 2})
    complete_fused_config(given)
    assert given.num_aux_hidden_states == 2
    eagle = SimpleNamespace(num_hidden_layers=2)
    complete_fused_config(eagle)
    assert not hasattr(eagle, NUM_FUSED)


def test_a_count_that_disagrees_with_the_layers_is_named():
    cfg = {**drafter_llama_config(TARGET, CORAL, 1, [1, 4, 6]), NUM_FUSED: 2}
    with pytest.raises(CoralConfigError, match='"num_aux_hidden_states" is 2 but'):
        fused_layers(cfg)


# --------------------------------------------------------------- fused layer order

@pytest.mark.parametrize("layers", [[5, 1, 6], [1, 1, 6], [6, 1]])
def test_fused_layers_must_be_strictly_increasing(layers):
    """vLLM's target appends aux states in layer order, each layer once (checked in the
    0.26 sources below): training on another order feeds fc permuted blocks."""
    with pytest.raises(CoralConfigError, match="strictly increasing"):
        check_fused_layers(layers, TARGET)
    cfg = {**drafter_llama_config(TARGET, CORAL, 1, sorted(set(layers))),
           FUSED_LAYERS: layers, NUM_FUSED: len(layers)}
    with pytest.raises(CoralConfigError, match="strictly increasing"):
        fused_layers(cfg)


def test_vllm_026_appends_aux_states_in_layer_order():
    src = _source("model_executor/models/interfaces.py")
    body = src[src.index("def _maybe_add_hidden_state"):]
    assert "if layer_idx in self.aux_hidden_state_layers:" in body[:600]
    llama = _source("model_executor/models/llama.py")
    assert "self._maybe_add_hidden_state([], 0, hidden_states, residual)" in llama
    assert "aux_hidden_states, idx + 1, hidden_states, residual" in llama
