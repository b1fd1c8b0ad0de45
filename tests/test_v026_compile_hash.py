"""vLLM 0.26.0's torch.compile cache key and the CORAL drafters, checked against a small
fake of 0.26's `SpeculativeConfig.compute_hash` (no engine, no GPU). Where the unpacked
0.26 sources are present (VLLM026_SRC, default /tmp/vllm026/src), a test also checks
that the fake still says what they say; it skips without them."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from coral_vllm.serving.plugin import hash_coral_draft, wrap_speculative_config_hash

SRC = Path(os.environ.get("VLLM026_SRC", "/tmp/vllm026/src")) / "vllm"


def _source(rel: str) -> str:
    path = SRC / rel
    if not path.is_file():
        pytest.skip(f"vLLM 0.26.0 sources not unpacked at {SRC}")
    return path.read_text()


# --------------------------------------------------------------- compile-cache key

class FakeSpeculativeConfig026:
    """0.26's SpeculativeConfig.compute_hash: the draft model only for aux methods."""

    def __init__(self, method, draft_model_config):
        self.method, self.draft_model_config = method, draft_model_config

    def compute_hash(self) -> str:
        factors = [self.method in ("eagle3", "extract_hidden_states", "dflash", "dspark")]
        if factors[0] and self.draft_model_config is not None:
            factors.append(self.draft_model_config.compute_hash())
        return str(factors)


def _draft(num_layers: int, arch: str = "EagleCoralLlamaForCausalLM", coral=True):
    hf = SimpleNamespace(num_hidden_layers=num_layers, eagle_aux_hidden_state_layer_ids=None,
                         **({"coral": {}} if coral else {}))
    return SimpleNamespace(architectures=[arch], hf_config=hf,
                           compute_hash=lambda: f"draft-{arch}-{num_layers}")


def test_eagle_drafters_of_different_depth_get_different_compile_keys():
    """Without the wrapper, 0.26 gives a 1-layer and a 2-layer eagle drafter one key."""
    one, two = (FakeSpeculativeConfig026("eagle", _draft(n)) for n in (1, 2))
    assert one.compute_hash() == two.compute_hash(), "the fake must show the 0.26 gap"
    cls = type("Spec", (FakeSpeculativeConfig026,), {})
    wrap_speculative_config_hash(cls)
    wrap_speculative_config_hash(cls)  # idempotent
    assert cls.compute_hash._coral_wrapped
    a, b = cls("eagle", _draft(1)), cls("eagle", _draft(2))
    assert a.compute_hash() != b.compute_hash()
    assert a.compute_hash() == cls("eagle", _draft(1)).compute_hash(), "must stay stable"
    # found by the "coral" section too (an architecture list vLLM rewrote)
    assert cls("eagle", _draft(1, arch="X")).compute_hash() != \
        cls("eagle", _draft(2, arch="X")).compute_hash()


def test_other_speculative_configs_keep_vllms_hash():
    cls = type("Spec", (FakeSpeculativeConfig026,), {})
    wrap_speculative_config_hash(cls)
    stock = _draft(2, arch="EagleLlamaForCausalLM", coral=False)
    assert cls("eagle", stock).compute_hash() == \
        FakeSpeculativeConfig026("eagle", stock).compute_hash()
    assert cls("ngram", None).compute_hash() == \
        FakeSpeculativeConfig026("ngram", None).compute_hash()


def test_the_hash_wrapper_runs_over_the_installed_vllms_method():
    """The wrapper over the real (0.32 here) SpeculativeConfig.compute_hash, called on a
    stand-in object (building a real SpeculativeConfig needs a model)."""
    from vllm.config import SpeculativeConfig

    original = SpeculativeConfig.compute_hash
    original = getattr(original, "__wrapped__", original)
    wrapped = hash_coral_draft(original)

    def spec(draft):
        return SimpleNamespace(method="eagle", draft_model_config=draft,
                               enable_adaptive_verification=False)
    assert wrapped(spec(_draft(1))) != wrapped(spec(_draft(2)))
    stock = _draft(1, arch="EagleLlamaForCausalLM", coral=False)
    assert wrapped(spec(stock)) == original(spec(stock))


def test_vllm_026_leaves_the_eagle_draft_out_of_its_hash():
    src = _source("config/speculative.py")
    body = src[src.index("def compute_hash"):src.index("def hf_config_override")]
    assert "if uses_aux_hidden_states and self.draft_model_config is not None" in body
