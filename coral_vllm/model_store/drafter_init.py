"""A correctly shaped, untrained CORAL drafter for a target: plumbing, tests, dummy runs.

Its weights are random (seeded), so it proposes tokens the target mostly rejects; it is
marked `"trained": false` and the plugin logs "UNTRAINED" when serving it. Training
(`coral-vllm train`) exports drafters in the same format.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from coral_vllm.format.checkpoint import expected_shapes, save_checkpoint
from coral_vllm.format.drafter_config import drafter_llama_config
from coral_vllm.format.config import GROUP_SHARING, NUM_GROUPS, TOP_K_GROUPS, CoralConfig
from coral_vllm.format.partition import build_token_order
from coral_vllm.model_store.target_heads import LM_HEAD, read_target_heads


def init_drafter(target_dir: str | Path, out_dir: str | Path, *,
                 num_groups: int = NUM_GROUPS, top_k_groups: int = TOP_K_GROUPS,
                 partition: str = "contiguous", seed: int = 0,
                 std: float = 0.02, selection: str = "router", num_layers: int = 1,
                 fused_layers: Sequence[int] | None = None,
                 group_sharing: str = GROUP_SHARING) -> Path:
    """Writes a random `num_layers`-layer drafter for the target at `target_dir` into
    `out_dir`; with `fused_layers`, one over those target layers (served as eagle3).

    selection "static" (no router tensors) needs partition "frequency"; with no data to
    count, all counts are equal and the order is the token ids'."""
    target_config = json.loads((Path(target_dir) / "config.json").read_text())
    coral = CoralConfig.for_vocab(target_config["vocab_size"], target_config["hidden_size"],
                                  num_groups, top_k_groups, partition=partition,
                                  selection=selection, group_sharing=group_sharing)
    config = drafter_llama_config(target_config, coral, num_layers, fused_layers)
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in expected_shapes(config, coral).items():
        if name == "partition.token_order":
            lm_head = (read_target_heads(target_dir)[LM_HEAD].float()
                       if partition == "cluster" else None)
            tensors[name] = build_token_order(partition, coral.vocab_size, num_groups,
                                              lm_head=lm_head,
                                              token_counts=torch.ones(coral.vocab_size))
        elif name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape)
        elif name.endswith(".bias"):
            tensors[name] = torch.zeros(shape)
        else:
            tensors[name] = torch.randn(shape, generator=g) * std
    return save_checkpoint(out_dir, config, tensors)
