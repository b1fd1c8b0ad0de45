"""vLLM general plugin: makes `"method": "coral"` a speculative method.

vLLM has no registry of speculative methods: `SpeculativeConfig.method` is a closed
Literal and both model runners pick proposers in hard-coded branches. The least invasive
hook that works on vLLM 0.26 and 0.32 alike has two parts:

1. The drafter is a new *model architecture* (`EagleCoralLlamaForCausalLM`), registered
   with `ModelRegistry` in every vLLM process (entry point `vllm.general_plugins`), and
   driven through vLLM's own EAGLE proposer, which already supports a head that returns
   top tokens (`use_local_argmax_reduction`).
2. `EngineArgs.create_speculative_config`, the one place a user's speculative config
   dict becomes a `SpeculativeConfig`, is wrapped so that `method: "coral"` is checked
   against the target and rewritten to `method: "eagle"` before pydantic sees it. The
   engine, its workers and its metrics then only ever see a standard EAGLE config.

A bad drafter therefore fails in the front-end process, before any engine starts.
"""

from __future__ import annotations

import functools
from typing import Any

from coral_vllm.format.config import DRAFTER_ARCHITECTURE, CoralConfigError

METHOD = "coral"
DEFAULT_NUM_SPECULATIVE_TOKENS = 3
_DRAFTER_CLASS = "coral_vllm.serving.drafter:EagleCoralLlamaForCausalLM"


def register() -> None:
    """Entry point; vLLM calls it in every process, possibly several times."""
    from vllm import ModelRegistry

    if DRAFTER_ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(DRAFTER_ARCHITECTURE, _DRAFTER_CLASS)
    _wrap_create_speculative_config()


def _wrap_create_speculative_config() -> None:
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_speculative_config
    if getattr(original, "_coral_wrapped", False):
        return

    @functools.wraps(original)
    def create_speculative_config(self, target_model_config, target_parallel_config):
        if self.spec_method == METHOD:
            self.spec_method = None
            self.speculative_config = {**(self.speculative_config or {}), "method": METHOD}
        spec = self.speculative_config
        if isinstance(spec, dict) and spec.get("method") == METHOD:
            self.speculative_config = translate_coral_config(
                spec, spec_model=self.spec_model, spec_tokens=self.spec_tokens,
                target_model_config=target_model_config,
                tensor_parallel_size=target_parallel_config.tensor_parallel_size)
            self.spec_model = self.spec_tokens = None
        return original(self, target_model_config, target_parallel_config)

    create_speculative_config._coral_wrapped = True  # type: ignore[attr-defined]
    EngineArgs.create_speculative_config = create_speculative_config


def translate_coral_config(spec: dict[str, Any], *, spec_model: str | None = None,
                           spec_tokens: int | None = None, target_model_config: Any = None,
                           tensor_parallel_size: int = 1) -> dict[str, Any]:
    """A user's `coral` speculative config -> the EAGLE config vLLM runs, checked first."""
    from coral_vllm.format.checkpoint import check_against_target, read_checkpoint

    out = {k.replace("-", "_"): v for k, v in spec.items()}
    if spec_model is not None:
        out.setdefault("model", spec_model)
    if spec_tokens is not None:
        out.setdefault("num_speculative_tokens", spec_tokens)
    if not out.get("model"):
        raise CoralConfigError(
            'speculative_config "model" is missing: the coral method needs the drafter '
            'directory, e.g. {"method": "coral", "model": "/path/to/drafter", '
            '"num_speculative_tokens": 3}.')
    ckpt = read_checkpoint(out["model"])
    if target_model_config is not None:
        target = {"model_type": target_model_config.hf_text_config.model_type,
                  "vocab_size": target_model_config.get_vocab_size(),
                  "hidden_size": target_model_config.get_hidden_size()}
        check_against_target(ckpt, target, target_name=f"target {target_model_config.model!r}")
    draft_tp = out.get("draft_tensor_parallel_size") or tensor_parallel_size
    if draft_tp != 1:
        raise CoralConfigError(
            f"coral: draft tensor parallel size {draft_tp} is not supported; the grouped "
            'head needs the whole LM head on one GPU. Set "draft_tensor_parallel_size": 1.')
    k = out.setdefault("num_speculative_tokens", DEFAULT_NUM_SPECULATIVE_TOKENS)
    if not isinstance(k, int) or k < 1:
        raise CoralConfigError(
            f'speculative_config "num_speculative_tokens" must be a positive integer, got {k!r}.')
    probabilistic = out.get("draft_sample_method") == "probabilistic"
    adaptive = bool(out.get("enable_adaptive_verification"))
    if out.get("use_local_argmax_reduction") and (probabilistic or adaptive):
        raise CoralConfigError(
            '"use_local_argmax_reduction" drafts greedily from top tokens; it cannot be '
            'combined with "draft_sample_method": "probabilistic" or adaptive verification.')
    # Greedy drafting goes through get_top_tokens (no full-vocabulary logits).
    out.setdefault("use_local_argmax_reduction", not (probabilistic or adaptive))
    out["method"] = "eagle"
    from vllm.logger import init_logger
    init_logger(__name__).info("coral: drafter %s (%d groups of %d, top-%d, %s partition%s), k=%d",
                ckpt.path, ckpt.coral.num_groups, ckpt.coral.group_size,
                ckpt.coral.top_k_groups, ckpt.coral.partition,
                "" if ckpt.coral.trained else ", UNTRAINED", k)
    return out
