"""Stage 3: write the plugin's drafter directory from a run directory.

Tensors: the trained drafter (`fc.*`, `layers.0.*`), the router and partition from
stage 2 (`router.pt`), optionally the target's `lm_head` / `embed_tokens`. Config: the
target's sizes (`drafter_llama_config`) + the `"coral"` section. Without a router stage
(EAGLE / HASS baselines) the export is *dense*: contiguous partition, an untrained router
and `top_k_groups = num_groups`, so the grouped head computes every row.
"""

from __future__ import annotations

from pathlib import Path

import torch

from coral_vllm.format.checkpoint import drafter_llama_config, save_checkpoint
from coral_vllm.format.config import CoralConfig
from coral_vllm.format.partition import contiguous_order
from coral_vllm.format.router import Router
from coral_vllm.models.target_heads import read_target_heads
from coral_vllm.training.config import TrainConfig
from coral_vllm.training.router_train import ROUTER_FILE
from coral_vllm.training.target import target_config_dict
from coral_vllm.training.trainer import load_state


def export(run_dir: str | Path, dest: str | Path, *, dense: bool = False,
           include_heads: bool = False, dtype: str = "bfloat16") -> Path:
    """Writes `dest` (config.json + model.safetensors); returns its path.

    dense: ignore router.pt and export the dense-head drafter (top_k = num_groups).
    include_heads: also store lm_head / embed_tokens (else vLLM shares the target's).
    """
    run = Path(run_dir)
    state = load_state(run)
    if state is None:
        raise FileNotFoundError(f"{run}: no stage-1 state (state/latest.pt); run `train`.")
    cfg = TrainConfig.from_dict(state["config"])
    tcfg = target_config_dict(cfg.target) if Path(cfg.target, "config.json").is_file() \
        else dict(state["target_config"])
    vocab, d = tcfg["vocab_size"], tcfg["hidden_size"]
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16,
                   "float32": torch.float32}[dtype]
    tensors: dict[str, torch.Tensor] = {k: v.to(torch_dtype) for k, v in state["model"].items()}

    router_path = run / ROUTER_FILE
    if router_path.is_file() and not dense:
        r = torch.load(router_path, map_location="cpu", weights_only=False)
        num_groups, top_k, partition = r["num_groups"], r["top_k_groups"], r["partition"]
        router_state, order, act = r["router"], r["token_order"], r["router_act"]
    else:
        num_groups, partition, act = cfg.num_groups, "contiguous", cfg.router_act
        top_k = num_groups
        router_state = Router(d, num_groups, act=act).state_dict()
        order = contiguous_order(vocab)
    coral = CoralConfig.for_vocab(vocab, d, num_groups, top_k, partition=partition,
                                  router_act=act, trained=True)
    tensors.update({f"router.{k}": v.to(torch_dtype) for k, v in router_state.items()})
    tensors["partition.token_order"] = order.to(torch.int64)
    if include_heads:
        heads = read_target_heads(cfg.target)
        tensors.update({k: v.to(torch_dtype) for k, v in heads.items()})
    config = drafter_llama_config(tcfg, coral)
    config["torch_dtype"] = config["dtype"] = dtype
    config["coral_training"] = {"num_steps": cfg.num_steps, "csra_weight": cfg.csra_weight,
                                "steps_trained": state["step"],
                                "router_stage": router_path.is_file() and not dense}
    return save_checkpoint(dest, config, tensors)
