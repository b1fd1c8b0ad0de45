"""The `create_speculative_config` wrapper against the signatures vLLM has used, and a
real (non-speculative and coral) engine configuration with the plugin loaded."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from coral_vllm.format.config import CoralConfigError
from coral_vllm.model_store.drafters import default_drafter
from coral_vllm.serving.plugin import wrap_create_speculative_config

TARGET = SimpleNamespace(get_vocab_size=lambda: 49152, get_hidden_size=lambda: 576,
                         hf_text_config=SimpleNamespace(model_type="llama"), model="smollm2")
PARALLEL = SimpleNamespace(tensor_parallel_size=1)


class Args032:
    """vLLM 0.26 and 0.32 alike: `(self, target_model_config, target_parallel_config)`,
    called with keywords, plus the --spec-method/--spec-model/--spec-tokens fields."""

    def __init__(self, speculative_config=None, spec_method=None, spec_model=None,
                 spec_tokens=None):
        self.speculative_config = speculative_config
        self.spec_method, self.spec_model, self.spec_tokens = spec_method, spec_model, spec_tokens

    def create_speculative_config(self, target_model_config, target_parallel_config):
        return {"config": self.speculative_config, "target": target_model_config,
                "short_flags": (self.spec_method, self.spec_model, self.spec_tokens)}


class ArgsOther:
    """A vLLM whose method takes two more arguments and has no --spec-* fields."""

    def __init__(self, speculative_config=None):
        self.speculative_config = speculative_config

    def create_speculative_config(self, target_model_config, target_parallel_config,
                                  enable_chunked_prefill, disable_log_stats):
        return {"config": self.speculative_config,
                "extra": (enable_chunked_prefill, disable_log_stats)}


@pytest.fixture
def wrapped():
    """Fresh fake classes, each wrapped the way register() wraps vLLM's EngineArgs."""
    classes = {cls.__name__: type(cls.__name__, (cls,), {}) for cls in (Args032, ArgsOther)}
    for cls in classes.values():
        wrap_create_speculative_config(cls)
    return classes


def _coral(**kw) -> dict:
    return {"method": "coral", "model": str(default_drafter()), **kw}


def test_plain_start_passes_through_untouched(wrapped):
    assert wrapped["Args032"]().create_speculative_config(
        target_model_config=TARGET, target_parallel_config=PARALLEL)["config"] is None
    other = wrapped["ArgsOther"]()
    assert other.create_speculative_config(TARGET, PARALLEL, True, False) == {
        "config": None, "extra": (True, False)}
    eagle = {"method": "eagle", "model": "/some/eagle"}
    out = wrapped["ArgsOther"](eagle).create_speculative_config(TARGET, PARALLEL, True, False)
    assert out["config"] is eagle


def test_coral_dict_becomes_eagle_on_every_signature(wrapped):
    out = wrapped["Args032"](_coral()).create_speculative_config(
        target_model_config=TARGET, target_parallel_config=PARALLEL)
    assert out["config"]["method"] == "eagle"
    assert out["config"]["use_local_argmax_reduction"] is True
    assert out["config"]["num_speculative_tokens"] == 3
    out = wrapped["ArgsOther"](_coral(num_speculative_tokens=2)).create_speculative_config(
        TARGET, PARALLEL, False, True)
    assert out["config"]["method"] == "eagle" and out["config"]["num_speculative_tokens"] == 2
    assert out["extra"] == (False, True), "the call's own arguments must pass through"


def test_short_flags_move_into_the_translated_config(wrapped):
    args = wrapped["Args032"](spec_method="coral", spec_model=str(default_drafter()),
                              spec_tokens=4)
    out = args.create_speculative_config(target_model_config=TARGET,
                                         target_parallel_config=PARALLEL)
    assert out["config"]["method"] == "eagle" and out["config"]["num_speculative_tokens"] == 4
    assert out["short_flags"] == (None, None, None)


def test_target_is_found_by_name_in_positional_calls(wrapped):
    small = SimpleNamespace(**{**vars(TARGET), "get_vocab_size": lambda: 32000,
                               "model": "other"})
    with pytest.raises(CoralConfigError, match='"vocab_size" is 49152'):
        wrapped["Args032"](_coral()).create_speculative_config(small, PARALLEL)


def test_pipeline_parallelism_is_refused_before_the_engine_starts(wrapped):
    staged = SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=2)
    with pytest.raises(CoralConfigError, match="pipeline_parallel_size is 2.*--tensor-parallel"):
        wrapped["Args032"](_coral()).create_speculative_config(TARGET, staged)
    one_stage = SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1)
    out = wrapped["Args032"](_coral()).create_speculative_config(TARGET, one_stage)
    assert out["config"]["method"] == "eagle"


def test_wrapping_twice_is_a_no_op(wrapped):
    cls = wrapped["Args032"]
    before = cls.create_speculative_config
    wrap_create_speculative_config(cls)
    assert cls.create_speculative_config is before


def test_a_vllm_without_the_fields_coral_sets_is_named(wrapped, monkeypatch):
    import vllm.config

    @dataclasses.dataclass
    class OldSpeculativeConfig:
        method: str = "eagle"
        model: str = ""
        num_speculative_tokens: int = 1

    monkeypatch.setattr(vllm.config, "SpeculativeConfig", OldSpeculativeConfig)
    with pytest.raises(CoralConfigError,
                       match=r"vLLM .*SpeculativeConfig has no \['use_local_argmax_reduction'\]"):
        wrapped["Args032"](_coral()).create_speculative_config(TARGET, PARALLEL)


@pytest.mark.parametrize("spec", [None, "coral"])
def test_real_engine_config_with_the_plugin_loaded(target_dir, spec):
    """vLLM's own EngineArgs (plugins loaded in __post_init__, so the wrapper is in place):
    a plain configuration has no speculative config, a coral one an EAGLE one."""
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=str(target_dir), dtype="float32", max_model_len=512,
                      speculative_config=_coral() if spec else None)
    assert getattr(EngineArgs.create_speculative_config, "_coral_wrapped", False)
    engine_config = args.create_engine_config()
    config = engine_config.speculative_config
    if spec is None:
        assert config is None
    else:
        assert config.method == "eagle" and config.use_local_argmax_reduction
        assert config.num_speculative_tokens == 3
        # the compile-cache key takes the drafter's config (hash_coral_draft), and a real
        # draft ModelConfig (EAGLEConfig with the "coral" section) hashes
        assert getattr(type(config).compute_hash, "_coral_wrapped", False)
        assert config.compute_hash() != type(config).compute_hash.__wrapped__(config)
        assert isinstance(engine_config.compute_hash(), str)
