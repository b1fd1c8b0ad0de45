"""The drafter's own config: N Llama layers sized from the target, whatever the target is.

The drafter is vLLM's EAGLE Llama drafter (`LlamaDecoderLayer`: RMSNorm, RoPE, SiLU-and-mul
MLP; layer 0 without input norm, later layers with it) for every target, with
`num_hidden_layers` = the drafter's depth (default 1). From the target's config.json it takes

- what the two must agree on: `vocab_size` and `hidden_size` (the drafter reads the
  target's last hidden state and shares its embedding and LM head), bos/eos ids, dtype,
  and how the target scales a token embedding before its first layer (`embed_scale`);
- the layer's sizes: heads, KV heads, head_dim, intermediate size, norm eps, positions.
  With the target's attention geometry the draft layer's KV-cache page is the target's,
  so vLLM files it with the target's full-attention layers and never has to unify page
  sizes (vLLM 0.26 refuses pages that neither divide each other nor can be padded,
  `v1/core/kv_cache_utils.py:1108-1126`);
- RoPE: the target's, or its full-attention one where it has one per layer type (Gemma-3:
  theta 1e6 for global layers, 1e4 for sliding ones); the drafter attends to everything.

Not taken: the target layer's own features (Gemma's GELU-tanh MLP, sliding windows,
q/k norms, (1 + w) norms, sandwich norms): those belong to the target's layers, not to
what the drafter shares with it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from coral_vllm.format.config import DRAFTER_ARCHITECTURE, CoralConfig, CoralConfigError

EMBED_SCALE = "embed_scale"
# The EAGLE-3-style drafter over fused target features (served with vLLM's `eagle3`), and
# the config key vLLM reads its target layers from (`eagle_aux_hidden_state_layer_ids`).
FUSED_ARCHITECTURE = "Eagle3CoralLlamaForCausalLM"
FUSED_LAYERS = "eagle_aux_hidden_state_layer_ids"
# How many target states vLLM's EAGLE-3 Llama drafter sizes fc for. vLLM (0.26 and 0.32,
# `llama_eagle3.LlamaModel`) reads this key, else `eagle_config`'s layer ids, else
# assumes 3; it does not count the top-level FUSED_LAYERS, which is what it hands out.
NUM_FUSED = "num_aux_hidden_states"

# Copied from the target: agreements and sizes (see the module docstring).
_COPIED_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
                "rope_scaling", "max_position_embeddings", "vocab_size", "attention_bias",
                "mlp_bias", "bos_token_id", "eos_token_id", "torch_dtype", "dtype")


def target_embed_scale(model_type: str, hidden_size: int) -> float:
    """How the target scales a token embedding before its first layer.

    Gemma multiplies by sqrt(hidden_size) in its model, not in the embedding module
    (vLLM `Gemma3Model.embed_input_ids`, `gemma3.py:341` in 0.26, `:328` in 0.32; in
    transformers `Gemma3TextScaledWordEmbedding`). vLLM hands an EAGLE drafter the bare
    module (`embed_tokens`), so the drafter applies the scale itself: Gemma-3-270M's raw
    embedding rows have RMS 0.04, next to target features of RMS ~4.
    """
    return math.sqrt(hidden_size) if model_type.startswith("gemma") else 1.0


def drafter_layer_config(config: Mapping[str, Any],
                         num_layers: int | None = None) -> dict[str, Any]:
    """The drafter layers' Llama config from a target's config.json.

    A drafter's own config gives the same layers back (it is a Llama config that already
    names its `embed_scale`), so the training model can be rebuilt from an export.
    `num_layers` sets the depth; by default a drafter's config (one with a "coral"
    section) keeps its own `num_hidden_layers` and a target's gives 1 (a target's
    `num_hidden_layers` is the target's depth, not the drafter's).
    """
    cfg = {k: config[k] for k in _COPIED_KEYS if k in config}
    rope = config.get("rope_parameters")
    if isinstance(rope, Mapping) and isinstance(rope.get("full_attention"), Mapping):
        rope = rope["full_attention"]
    if rope is not None:
        cfg["rope_parameters"] = dict(rope)
    scale = config.get(EMBED_SCALE)
    if scale is None:
        scale = target_embed_scale(config.get("model_type", ""), config["hidden_size"])
    if num_layers is None:
        num_layers = config.get("num_hidden_layers") if "coral" in config else 1
    if not (isinstance(num_layers, int) and num_layers >= 1):
        raise CoralConfigError(
            f'"num_hidden_layers" (the drafter\'s depth) is {num_layers!r}; it must be a '
            "positive integer (train with --num-layers N, default 1).")
    cfg.update(model_type="llama", hidden_act="silu", num_hidden_layers=num_layers,
               **{EMBED_SCALE: float(scale)})
    return cfg


def drafter_llama_config(target_config: Mapping[str, Any], coral: CoralConfig,
                         num_layers: int = 1,
                         fused_layers: Sequence[int] | None = None) -> dict[str, Any]:
    """The drafter checkpoint's config.json: its layers, architecture and "coral" section.

    `fused_layers`: the target layers whose outputs an EAGLE-3-style drafter reads
    (`FUSED_ARCHITECTURE`); None for the EAGLE drafter over the last hidden state."""
    cfg = drafter_layer_config(target_config, num_layers)
    cfg.update(architectures=[DRAFTER_ARCHITECTURE], tie_word_embeddings=False,
               coral=coral.to_dict())
    if fused_layers is not None:
        layers = check_fused_layers(fused_layers, target_config)
        cfg.update(architectures=[FUSED_ARCHITECTURE],
                   **{FUSED_LAYERS: layers, NUM_FUSED: len(layers)})
    return cfg


def default_fused_layers(num_target_layers: int) -> tuple[int, ...]:
    """vLLM's default EAGLE-3 layers (`SupportsEagle3.get_eagle3_default_aux_hidden_
    state_layers`, which its Llama and Qwen2 keep: low, middle, high). Written into the
    drafter's config, so serving never depends on this default."""
    return (2, num_target_layers // 2, num_target_layers - 3)


def check_fused_layers(layers: Sequence[int], target_config: Mapping[str, Any]) -> list[int]:
    """Target layer ids vLLM can hand out: aux state L is the residual stream after L
    layers (0 = the embeddings), so 0 <= L < num_hidden_layers (the last layer's output is
    what EAGLE reads, after the final norm); strictly increasing (`check_fused_order`)."""
    n = target_config["num_hidden_layers"]
    layers = list(layers)
    if not layers or any(not isinstance(x, int) or not 0 <= x < n for x in layers):
        raise CoralConfigError(
            f'"{FUSED_LAYERS}" is {layers!r}; give target layer ids in [0, {n}) '
            f"(the target has {n} layers), e.g. {list(default_fused_layers(n))}.")
    return check_fused_order(layers)


def check_fused_order(layers: list[int]) -> list[int]:
    """vLLM's targets (`EagleModelMixin._maybe_add_hidden_state`, 0.26 and 0.32) append
    an aux state as their layer loop passes a listed id: in increasing layer order, each
    layer once, whatever order the list has. Training concatenates in list order, so an
    unsorted list feeds fc its blocks permuted (drafts accepted by chance only) and a
    repeated id makes fc's input shorter than fc (a crash in the first draft step)."""
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise CoralConfigError(
            f'"{FUSED_LAYERS}" is {layers!r}; vLLM hands the drafter these target '
            f"layers' states in increasing order, each once, so list them strictly "
            f"increasing (e.g. {sorted(set(layers))}) and train the drafter on that list.")
    return layers


def fused_layers(config: Mapping[str, Any]) -> list[int] | None:
    """A drafter config's fused target layers, None for an EAGLE drafter."""
    if config.get("architectures") != [FUSED_ARCHITECTURE]:
        return None
    layers = config.get(FUSED_LAYERS)
    if not (isinstance(layers, list) and layers and all(isinstance(x, int) for x in layers)):
        raise CoralConfigError(
            f'config.json "{FUSED_LAYERS}" is {layers!r}; an {FUSED_ARCHITECTURE} drafter '
            "needs the target layer ids it was trained on: re-export the drafter.")
    count = config.get(NUM_FUSED, len(layers))
    if count != len(layers):
        raise CoralConfigError(
            f'config.json "{NUM_FUSED}" is {count!r} but "{FUSED_LAYERS}" lists '
            f"{len(layers)} layers; vLLM sizes fc from the first, so they must agree: "
            "re-export the drafter.")
    return check_fused_order(layers)


def complete_fused_config(hf_config: Any) -> None:
    """Gives a fused drafter's (vLLM) config `NUM_FUSED` when it lacks it (drafters
    exported before the key was written), so vLLM's EAGLE-3 drafter builds fc over the
    listed layers instead of its default of 3: without it a drafter over k != 3 layers
    fails to load (fc [d, 3d] against the checkpoint's [d, k*d])."""
    layers = getattr(hf_config, FUSED_LAYERS, None)
    if layers and getattr(hf_config, NUM_FUSED, None) is None:
        setattr(hf_config, NUM_FUSED, len(layers))


def embed_scale(config: Mapping[str, Any]) -> float:
    """A drafter config's embedding scale (1 for drafters that predate the key)."""
    return float(config.get(EMBED_SCALE, 1.0))


def fold_embed_scale(fc_weight: torch.Tensor, scale: float) -> torch.Tensor:
    """fc over [scale * embed, feature] as an fc over [embed, feature]: vLLM's EAGLE
    layer feeds fc the bare shared embedding, so the scale goes into fc's first d columns."""
    d = fc_weight.shape[1] // 2
    return torch.cat([fc_weight[:, :d] * scale, fc_weight[:, d:]], dim=1)
