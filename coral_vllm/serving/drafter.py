"""The CORAL drafters as vLLM models: vLLM's EAGLE / EAGLE-3 Llama drafters plus a router
and a grouped LM head (`coral_head.CoralHeadMixin`).

- `EagleCoralLlamaForCausalLM` (served through vLLM's `eagle` method): everything up to
  the output feature is vLLM's `EagleLlamaForCausalLM` (fc over [token embedding, target
  hidden state] -> `num_hidden_layers` Llama layers, the first without input norm). The
  one change there: a target that scales its token embeddings (Gemma: sqrt(d), applied
  in its model's forward, so the embedding module vLLM shares with the drafter is
  unscaled) has that `embed_scale` folded into fc's embedding columns at load.
- `Eagle3CoralLlamaForCausalLM` (served through vLLM's `eagle3` method): vLLM's
  `Eagle3LlamaForCausalLM` unchanged up to its normed output: fc over the target's fused
  low/mid/high hidden states (`combine_hidden_states`), layer 0 over [normed embedding,
  normed feature], a final norm. vLLM's legacy V1 proposer only accepts its own Eagle3
  classes for `eagle3`, hence the subclass. The grouped head scores the normed output.

Both get the same head from the mixin: router + grouped head, or the static draft
vocabulary (`"selection": "static"`), each also sharded per rank with TP > 1.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.llama_eagle import EagleLlamaForCausalLM
from vllm.model_executor.models.llama_eagle3 import Eagle3LlamaForCausalLM

from coral_vllm.format.drafter_config import (complete_fused_config, embed_scale,
                                              fold_embed_scale)
from coral_vllm.serving.coral_head import CoralHeadMixin


class EagleCoralLlamaForCausalLM(CoralHeadMixin, EagleLlamaForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._init_coral_head(vllm_config, prefix)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """EAGLE weights go through vLLM's loader (then fc takes the embedding scale);
        router and partition are ours (a static drafter ignores router tensors)."""
        own: dict[str, torch.Tensor] = {}
        super().load_weights(self._split_coral_weights(weights, own))
        fc = self.model.fc.weight
        fc.data.copy_(fold_embed_scale(fc.data, embed_scale(self.config.to_dict())))
        self._load_coral_weights(own)


class Eagle3CoralLlamaForCausalLM(CoralHeadMixin, Eagle3LlamaForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        # vLLM sizes fc from `num_aux_hidden_states` (default 3), not from the layer list
        # it hands out; drafters exported before that key was written still load
        complete_fused_config(vllm_config.speculative_config.draft_model_config.hf_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._init_coral_head(vllm_config, prefix)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """EAGLE-3 weights go through vLLM's loader; router and partition are ours.
        (No embedding scale: layer 0 RMS-normalises the embedding, and the plugin only
        accepts eagle3 drafters for targets that do not scale it.)"""
        own: dict[str, torch.Tensor] = {}
        super().load_weights(self._split_coral_weights(weights, own))
        self._load_coral_weights(own)
