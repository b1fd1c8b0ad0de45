"""Stage 1: train the drafter (EAGLE / HASS multi-step / CORAL's CSRA).

One optimizer step:
    f = target(x)                         post-norm features [B, S, d], no grad
    position t: input (f_t + noise, x_{t+1}), target f_{t+1} (and lm_head(f_{t+1}))
    step 1:   o1 = drafter(x_{+1}, f + noise)
    step j+1: input feature at t is o_j[t-1].detach() (the drafter's own prediction of
              f_t, made one position earlier; position 0 keeps f_0) -- HASS
    loss = sum_j w^(j-1) * [SmoothL1(o_j, f_{+1}) + 0.1 * CE(p_target, head(o_j))]
           + csra_weight * InfoNCE(o_1..o_n across steps)
on positions whose predicted token x_{t+2} is a response token.

HASS's harmonized context alignment is on by default (`context_alignment`): at step j
a query attends to the keys/values the same draft sees at inference (target-feature keys
before the draft's start, then one key per earlier step); off, all context keys come
from step j's own inputs (naive multi-step).

Resumable: `out/state/latest.pt` (model, optimizer, scheduler, step, RNG) is written
atomically every `save_every` steps, at the time limit and at the end; rerunning the
same command continues from it. Multi-GPU: `torchrun --nproc-per-node N` (DDP).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from coral_vllm.training.config import TrainConfig
from coral_vllm.training.data import TokenDataset, collate, split_indices
from coral_vllm.training.losses import csra_loss, step_loss, target_distribution
from coral_vllm.training.model import CoralDrafter
from coral_vllm.training.target import load_target, target_features

STATE_FILE = "state/latest.pt"


# ------------------------------------------------------------------ batch plumbing
def shift_for_drafter(feats: torch.Tensor, input_ids: torch.Tensor,
                      loss_mask: torch.Tensor, attention_mask: torch.Tensor
                      ) -> dict[str, torch.Tensor]:
    """EAGLE alignment: position t reads (f_t, x_{t+1}), predicts f_{t+1} and x_{t+2}.

    Returns tensors of length S-1: feat_in (f_t), ids_in (x_{t+1}), feat_tgt (f_{t+1}),
    mask (1 where x_{t+2} exists and is a response token).
    """
    valid = (loss_mask * attention_mask)[:, 2:]
    mask = torch.zeros_like(input_ids[:, 1:])
    mask[:, :-1] = valid
    return {"feat_in": feats[:, :-1], "ids_in": input_ids[:, 1:],
            "feat_tgt": feats[:, 1:], "mask": mask}


def multi_step_forward(drafter, ids_in: torch.Tensor, feat_in: torch.Tensor,
                       num_steps: int, context_alignment: bool = True) -> list[torch.Tensor]:
    """HASS: step 1 reads target features; step j+1 reads step j's detached outputs
    shifted one position right (o_j[t-1] stands in for f_t; position 0 keeps f_0).

    context_alignment (HASS): step j's queries attend to the keys/values that the
    same draft would see at inference (target-feature keys before the draft's start,
    then one key per earlier step); off, every context key is from step j's inputs.
    """
    outs: list[torch.Tensor] = []
    feat = feat_in
    past: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # per step, per layer
    for _ in range(num_steps):
        if context_alignment:
            layers_past = ([[p[i] for p in past] for i in range(len(past[0]))]
                           if past else None)
            out, kv = drafter(ids_in, feat, past_kv=layers_past, return_kv=True)
            past.append(kv)
        else:
            out = drafter(ids_in, feat)
        outs.append(out)
        feat = torch.cat([feat_in[:, :1], out[:, :-1].detach().to(feat_in.dtype)], dim=1)
    return outs


class MultiStep(torch.nn.Module):
    """The n-step forward as one module call (what DDP wraps: one forward per backward)."""

    def __init__(self, drafter: CoralDrafter, num_steps: int, context_alignment: bool) -> None:
        super().__init__()
        self.drafter, self.num_steps, self.align = drafter, num_steps, context_alignment

    def forward(self, ids_in: torch.Tensor, feat_in: torch.Tensor) -> list[torch.Tensor]:
        return multi_step_forward(self.drafter, ids_in, feat_in, self.num_steps, self.align)


def compute_loss(outs: list[torch.Tensor], feat_tgt: torch.Tensor, mask: torch.Tensor,
                 lm_head: torch.Tensor, cfg: TrainConfig,
                 generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    sel = mask.bool()
    tgt = feat_tgt[sel].float()
    head = lm_head.float()
    total = feat_tgt.new_zeros((), dtype=torch.float32)
    stats: dict[str, float] = {}
    if tgt.shape[0] == 0:
        return total + sum(o.sum() for o in outs) * 0.0, {"loss": 0.0}
    picked = [o[sel].float() for o in outs]
    target = target_distribution(tgt, head)
    for j, pred in enumerate(picked):
        loss_j, s = step_loss(pred, tgt, head, feature_weight=cfg.feature_loss_weight,
                              distill_weight=cfg.distill_weight, target=target)
        total = total + (cfg.step_weight_decay ** j) * loss_j
        stats.update({f"{k}{j + 1}": v for k, v in s.items()})
    if cfg.csra_weight > 0 and len(picked) > 1:
        c = csra_loss(torch.stack(picked), cfg.csra_temperature, cfg.csra_max_positions,
                      generator)
        total = total + cfg.csra_weight * c
        stats["csra"] = c.item()
    stats["loss"] = total.item()
    return total, stats


# ------------------------------------------------------------------ state on disk
def atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    s = {"torch": torch.get_rng_state(), "python": random.getstate(),
         "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def load_state(out: str | Path) -> dict[str, Any] | None:
    path = Path(out) / STATE_FILE
    return torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else None


def lr_lambda(cfg: TrainConfig, total_steps: int):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        cos = 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cos
    return f


# ------------------------------------------------------------------ distributed
def setup_distributed() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if world > 1 else 0
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return rank, world, device


# ------------------------------------------------------------------ the loop
def train(cfg: TrainConfig, device: str | None = None,
          stop_at_step: int | None = None) -> dict[str, Any]:
    """Runs (or resumes) stage 1; returns {'step', 'total_steps', 'done', 'last'}.

    `stop_at_step` ends this invocation early (as the time limit does), for chunked runs.
    """
    from tqdm.auto import tqdm

    t0 = time.time()  # the time limit counts loading too
    rank, world, dev = setup_distributed()
    if device is not None:
        dev = torch.device(device)
    out = Path(cfg.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)

    use_bf16 = dev.type == "cuda" and cfg.dtype in ("auto", "bfloat16", "bf16")
    target, _, tcfg = load_target(cfg.target, dev,
                                  torch.bfloat16 if use_bf16 else torch.float32)
    drafter = CoralDrafter(tcfg, cfg.num_groups, cfg.router_act)
    drafter.load_target_heads(target)
    if cfg.init_from_target:
        drafter.init_layer_from_target(target)
    drafter.to(dev)
    params = [p for p in drafter.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas),
                            weight_decay=cfg.weight_decay)

    ds = TokenDataset(cfg.data, cfg.max_len)
    train_idx, _ = split_indices(len(ds), cfg.router_holdout)
    subset = torch.utils.data.Subset(ds, train_idx)
    per_step = cfg.batch_size * world
    steps_per_epoch = max(1, len(subset) // per_step)
    total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total_steps))

    step = 0
    state = load_state(out)
    if state is not None:
        drafter.load_state_dict(state["model"], strict=False)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = state["step"]
        set_rng_state(state["rng"][min(rank, len(state["rng"]) - 1)])
        if rank == 0:
            print(f"resuming {out} at step {step}/{total_steps}")
    model: torch.nn.Module = MultiStep(drafter, cfg.num_steps, cfg.context_alignment)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None)

    sampler = torch.utils.data.DistributedSampler(subset, num_replicas=world, rank=rank,
                                                  shuffle=True, seed=cfg.seed,
                                                  drop_last=True)
    csra_gen = torch.Generator().manual_seed(cfg.seed + 1)
    if state is not None and "csra_rng" in state:
        csra_gen.set_state(state["csra_rng"])
    bar = tqdm(total=total_steps, initial=step, desc=f"train {out.name}",
               disable=rank != 0, dynamic_ncols=True)
    metrics_file = out / "metrics.jsonl"
    last: dict[str, float] = {}
    stopped_early = False
    order: list[int] = []
    epoch_of_order = -1
    while step < total_steps:
        epoch, k = divmod(step, steps_per_epoch)
        if epoch != epoch_of_order:
            sampler.set_epoch(epoch)
            order, epoch_of_order = list(iter(sampler)), epoch
        idx = order[k * cfg.batch_size: (k + 1) * cfg.batch_size]
        batch = collate([subset[i] for i in idx])
        batch = {key: v.to(dev) for key, v in batch.items()}
        feats = target_features(target, batch["input_ids"], batch["attention_mask"])
        b = shift_for_drafter(feats, batch["input_ids"], batch["loss_mask"],
                              batch["attention_mask"])
        feat_in = b["feat_in"]
        if cfg.feature_noise > 0:
            feat_in = feat_in + (torch.rand_like(feat_in) - 0.5) * cfg.feature_noise
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
            outs = model(b["ids_in"], feat_in)
        loss, stats = compute_loss(outs, b["feat_tgt"], b["mask"], drafter.lm_head.weight,
                                   cfg, csra_gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        opt.step()
        sched.step()
        step += 1
        last = stats
        bar.update(1)
        if rank == 0 and (step % cfg.log_every == 0 or step == total_steps):
            bar.set_postfix(loss=f"{stats['loss']:.3f}", acc1=f"{stats.get('acc1', 0):.2f}")
            with open(metrics_file, "a") as f:
                f.write(json.dumps({"step": step, "lr": sched.get_last_lr()[0],
                                    **stats}) + "\n")
        out_of_time = cfg.time_limit_min > 0 and time.time() - t0 > cfg.time_limit_min * 60
        if world > 1 and cfg.time_limit_min > 0:  # every rank must stop at the same step
            flag = torch.tensor([float(out_of_time)], device=dev)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            out_of_time = bool(flag.item())
        chunk_end = stop_at_step is not None and step >= stop_at_step
        if step % cfg.save_every == 0 or step == total_steps or out_of_time or chunk_end:
            _save(out, drafter, opt, sched, step, total_steps, cfg, world, rank, csra_gen)
        if (out_of_time or chunk_end) and step < total_steps:
            stopped_early = True
            break
    bar.close()
    if rank == 0:
        if stopped_early:
            print(f"stopped at step {step}/{total_steps}; rerun the same command to resume.")
        else:
            print(f"stage 1 done: {step} steps; next: `train router --out {out}`.")
    if world > 1:
        dist.barrier()
    return {"step": step, "total_steps": total_steps, "done": step >= total_steps,
            "last": last}


def _save(out: Path, drafter: CoralDrafter, opt, sched, step: int, total: int,
          cfg: TrainConfig, world: int, rank: int, csra_gen: torch.Generator) -> None:
    rngs = [rng_state()]
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, rngs[0])
        rngs = gathered
    if rank != 0:
        return
    atomic_save({"model": drafter.drafter_state_dict(), "optimizer": opt.state_dict(),
                 "scheduler": sched.state_dict(), "step": step, "total_steps": total,
                 "rng": rngs, "csra_rng": csra_gen.get_state(), "config": cfg.to_dict(),
                 "target_config": drafter.cfg},
                out / STATE_FILE)
    cfg.save(out / "train_config.json")
