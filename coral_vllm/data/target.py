"""The frozen target: load it with transformers and read the features a drafter learns from.

Features are the target's LAST hidden state AFTER the final norm (what vLLM hands an
EAGLE drafter), followed, for an EAGLE-3-style drafter, by the residual streams of a few
of its layers (`target_features`). The target's next-token logits are
`lm_head(feature)`, so only features are ever kept: a loss that wants logits recomputes
them. `data.feature_store` runs the target over a whole split once and keeps the result.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_target(path: str | Path, device: str | torch.device | None = None,
                dtype: torch.dtype | None = None):
    """(model, tokenizer or None, config dict). float32 on CPU, bf16 on GPU by default."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = pick_device(str(device) if device else None)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    model.to(device).eval().requires_grad_(False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception:  # a bare test model has no tokenizer files
        tokenizer = None
    return model, tokenizer, target_config_dict(path)


def target_config_dict(path: str | Path) -> dict[str, Any]:
    """The target's config.json as a plain dict (what the exported drafter copies)."""
    return json.loads((Path(path) / "config.json").read_text())


def base_model(model):
    """The decoder stack (LlamaModel) of a *ForCausalLM."""
    return model.model if hasattr(model, "model") else model.get_decoder()


@torch.no_grad()
def target_features(model, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None = None,
                    fused_layers: Sequence[int] | None = None) -> torch.Tensor:
    """Post-final-norm last hidden states [B, S, d] (vLLM's EAGLE input).

    With `fused_layers` (EAGLE-3-style drafters) the fused layers follow it:
    [B, S, (1 + k) * d] = [last | aux_l for l in fused_layers] (`split_features`). vLLM's
    aux state l is the residual stream after l target layers, residual added, before any
    norm (`_maybe_add_hidden_state(aux, idx + 1, hidden_states, residual)` in its Llama
    forward: `hidden_states + residual`); transformers' `hidden_states[l]` is that state
    for l < num_hidden_layers (its last entry is after the final norm, hence the bound in
    `check_fused_layers`)."""
    out = base_model(model)(input_ids=input_ids, attention_mask=attention_mask,
                            use_cache=False, output_hidden_states=fused_layers is not None)
    if fused_layers is None:
        return out.last_hidden_state
    return torch.cat([out.last_hidden_state, *(out.hidden_states[l] for l in fused_layers)],
                     dim=-1)


def split_features(features: torch.Tensor, hidden_size: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(the target's last hidden state: what the drafter predicts and the head scores,
    what the drafter reads) from `target_features`' output: the same tensor for EAGLE."""
    if features.shape[-1] == hidden_size:
        return features, features
    return features[..., :hidden_size], features[..., hidden_size:]
