"""Stage 3: write the plugin's drafter directory from a run directory.

Tensors: the trained drafter (`fc.*`, `layers.{0..N-1}.*`, fused: `norm.*`) of the best (or latest) checkpoint,
the router and partition (stage 2's `router.pt` if it ran, else the online router),
optionally the target's `lm_head` / `embed_tokens`. Config: the target's sizes
and the run's `num_layers` / fused target layers (`drafter_llama_config`) + the `"coral"`
section. A *dense* export (EAGLE / HASS baselines) sets `top_k_groups = num_groups`, so
the grouped head computes every row. A *static* export (the EAGLE-3 / FR-Spec static
draft vocabulary) keeps the trained layers and the run's grouping but no router:
`selection: "static"` over the frequency partition, with the CORAL drafter's
`top_k_groups` (equal active rows) unless `static_rows` sizes it. Depth, fused features
and the head selection are independent: any drafter can be exported static. A routed
export pins the groups stage 2 chose (`pinned_groups`, 0 where it did not run or chose
none; `format.config.PINNED_GROUPS`) unless `pinned_groups` overrides it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from coral_vllm.format.checkpoint import LAYER_PREFIXES, save_checkpoint
from coral_vllm.format.drafter_config import drafter_llama_config
from coral_vllm.format.config import GROUP_SHARING, CoralConfig
from coral_vllm.format.partition import contiguous_order, frequency_order
from coral_vllm.head.router import Router
from coral_vllm.model_store.target_heads import read_target_heads
from coral_vllm.training.config import TrainConfig
from coral_vllm.data.shards import load_splits, train_token_counts
from coral_vllm.data.target import target_config_dict
from coral_vllm.training.run_dir import BEST_FILE, ROUTER_FILE, STATE_FILE, load_state, \
    swept_router_file


def export(run_dir: str | Path, dest: str | Path, *, dense: bool = False,
           include_heads: bool = False, dtype: str = "bfloat16",
           checkpoint: str = "best", selection: str = "router",
           static_rows: int | None = None, group_sharing: str = GROUP_SHARING,
           router_sweep: bool = False, pinned_groups: int | None = None) -> Path:
    """Writes `dest` (config.json + model.safetensors); returns its path.

    checkpoint: "best" (best.pt, the best validation tau; falls back to the latest state
    if the run has none) or "latest" (state/latest.pt).
    dense: top_k_groups = num_groups, the grouped head computes every row (baselines).
    include_heads: also store lm_head / embed_tokens (else vLLM shares the target's).
    The router and partition come from stage 2 (`router.pt`) if it ran, else from the
    router trained beside the drafter; router_sweep: from the setting the run's router
    sweep chose (its group count too), for the static head as well.
    selection: "router" (CORAL) or "static" (no router; `static_partition`), whose
    `static_rows` picks the top_k_groups nearest that many rows (default: the router's).
    group_sharing: "token" (each drafted token its own groups) or "batch" (one set per
    draft step; `format.config.GROUP_SHARINGS`).
    pinned_groups: the routed drafter's always-active first groups instead of the count
    stage 2 chose (the drafter's config checks it: below top_k_groups, frequency partition).
    """
    _check_options(checkpoint, selection, dense, static_rows, pinned_groups)
    run = Path(run_dir)
    best = load_state(run, BEST_FILE) if checkpoint == "best" else None
    chosen = best or load_state(run)  # the latest state: asked for, or no best.pt
    if chosen is None:
        raise FileNotFoundError(
            f"{run}: no {STATE_FILE} (checkpoint latest); the run came without its state: "
            f"export its {BEST_FILE} (checkpoint best)" if checkpoint == "latest" else
            f"{run}: no stage-1 state ({BEST_FILE} or {STATE_FILE}); run `train`.")
    # Either file holds the run's config, the target's sizes and the step, so best.pt
    # alone exports (a finished run may travel without its state: the optimizer's
    # moments make it ~3x the size), and the state is never read when best.pt is there.
    cfg = TrainConfig.from_dict(chosen["config"])
    tcfg = target_config_dict(cfg.target) if Path(cfg.target, "config.json").is_file() \
        else dict(chosen["target_config"])
    vocab, d = tcfg["vocab_size"], tcfg["hidden_size"]
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16,
                   "float32": torch.float32}[dtype]
    model = chosen["model"]
    tensors = {k: v.to(torch_dtype) for k, v in model.items()
               if k.startswith(LAYER_PREFIXES)}
    router_path = swept_router_file(run) if router_sweep else run / ROUTER_FILE
    r = _routing(router_path, cfg, model, vocab, d)
    if pinned_groups is not None:
        r.pinned_groups = pinned_groups
    if dense:  # every group is active: nothing to pin
        r.top_k_groups, r.pinned_groups = r.num_groups, 0
    if selection == "static":
        r.partition, r.router, r.pinned_groups, r.token_order = "frequency", {}, 0, \
            static_partition(router_path, cfg, vocab)
    coral = CoralConfig.for_vocab(vocab, d, r.num_groups, r.top_k_groups,
                                  partition=r.partition, router_act=r.router_act,
                                  selection=selection, group_sharing=group_sharing,
                                  pinned_groups=r.pinned_groups, trained=True)
    if static_rows is not None:
        coral = coral.with_active_rows(static_rows)
    tensors.update({f"router.{k}": v.to(torch_dtype) for k, v in r.router.items()})
    tensors["partition.token_order"] = r.token_order.to(torch.int64)
    if include_heads:
        heads = read_target_heads(cfg.target)
        tensors.update({k: v.to(torch_dtype) for k, v in heads.items()})
    config = drafter_llama_config(tcfg, coral, cfg.num_layers, cfg.fused_layer_ids(tcfg))
    config["torch_dtype"] = config["dtype"] = dtype
    config["coral_training"] = {"num_steps": cfg.num_steps, "csra_weight": cfg.csra_weight,
                                "steps_trained": chosen["step"],
                                "checkpoint": "best" if best is not None else "latest",
                                "validation": chosen.get("eval"),
                                "router_stage": r.source == "stage 2",
                                "router_online": r.source == "online",
                                "dense": dense, "selection": selection}
    return save_checkpoint(dest, config, tensors)


def _check_options(checkpoint: str, selection: str, dense: bool,
                   static_rows: int | None, pinned_groups: int | None) -> None:
    if checkpoint not in ("best", "latest"):
        raise ValueError(f"checkpoint={checkpoint!r}: choose best or latest")
    if selection == "static" and dense:
        raise ValueError("dense and selection='static' exclude each other: a dense drafter "
                         "scores every row, a static one its first top_k_groups groups")
    if static_rows is not None and selection != "static":
        raise ValueError("static_rows sizes a static drafter: pass selection='static' too")
    if pinned_groups is not None and (dense or selection == "static"):
        raise ValueError("pinned_groups pins groups beside the router's picks: a dense "
                         "drafter scores every group and a static one fixes all of its "
                         "groups; leave it out, or export the routed drafter")


@dataclasses.dataclass
class _Routing:
    """The router and partition a drafter is exported with, and where they come from."""
    num_groups: int
    top_k_groups: int
    partition: str
    router_act: str
    router: dict[str, torch.Tensor]
    token_order: torch.Tensor
    source: str  # "stage 2" (router.pt), "online" (trained beside the drafter), "untrained"
    pinned_groups: int = 0  # stage 2's choice; the online router pins none


def _routing(router_path: Path, cfg: TrainConfig, model: dict[str, torch.Tensor],
             vocab: int, d: int) -> _Routing:
    """Stage 2's router and partition (`router_path`) if it ran, else the online
    router's, else (a run without one) an untrained router over the contiguous partition.
    A router.pt written before pinned groups pins none."""
    if router_path.is_file():
        r = torch.load(router_path, map_location="cpu", weights_only=False)
        return _Routing(r["num_groups"], r["top_k_groups"], r["partition"], r["router_act"],
                        r["router"], r["token_order"], "stage 2", r.get("pinned_groups", 0))
    if cfg.router_online and "partition.token_order" in model:
        router = {k[len("router."):]: v for k, v in model.items() if k.startswith("router.")}
        return _Routing(cfg.num_groups, cfg.top_k_groups, cfg.online_partition(),
                        cfg.router_act, router, model["partition.token_order"], "online")
    return _Routing(cfg.num_groups, cfg.top_k_groups, "contiguous", cfg.router_act,
                    Router(d, cfg.num_groups, act=cfg.router_act).state_dict(),
                    contiguous_order(vocab), "untrained")


def static_partition(router_path: Path, cfg: TrainConfig, vocab: int) -> torch.Tensor:
    """The frequency partition a static drafter serves the first groups of: the one stage
    2 measured it on (`router_path`'s `frequency_order`, so the drafter is the one its
    report's `static_head` describes), else counted from the run's training split the
    way stages 1 and 2 count it."""
    if router_path.is_file():
        order = torch.load(router_path, map_location="cpu",
                           weights_only=False).get("frequency_order")
        if order is not None:
            return order
    if not Path(cfg.data).is_dir():
        raise FileNotFoundError(
            f"a static drafter takes the frequency partition of the run's training data "
            f"{cfg.data}, which is not here, nor is {router_path}; export where the data "
            f"is, or run `coral-vllm train router --out RUN` there first (router.pt keeps it).")
    train_t, _ = load_splits(cfg.data, cfg.max_len, cfg.router_holdout)
    return frequency_order(train_token_counts(train_t, vocab))
