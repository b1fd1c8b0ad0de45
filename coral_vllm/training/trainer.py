"""Stage 1: train the drafter (EAGLE / HASS multi-step / CORAL's CSRA), validated as it goes.

One optimizer step:
    f = target features, computed once for the whole split (features.py)
    position t: input (f_t + noise, x_{t+1}), target f_{t+1} (and lm_head(f_{t+1}));
              with fused_layers the input is the fused layers' states at t instead
    step 1:   o1 = drafter(x_{+1}, f + noise)
    step j+1: input feature at t is o_j[t-1].detach() (the drafter's own prediction of
              f_t, made one position earlier; position 0 keeps f_0) -- HASS
    loss = sum_j w^(j-1) * [SmoothL1(o_j, f_{+1}) + 0.1 * CE(p_target, head(o_j))]
           + csra_weight * InfoNCE(o_1..o_n across steps)
           + CE(router(o_j.detach()), group of the target's top-1)      (router, online)
on positions whose predicted token x_{t+2} is a response token. The soft cross-entropy
runs through the head in chunks (head_loss.py): no [N, V] tensor is kept.

HASS's harmonized context alignment is on by default (`context_alignment`): at step j
a query attends to the keys/values the same draft sees at inference (target-feature keys
before the draft's start, then one key per earlier step); off, all context keys come
from step j's own inputs (naive multi-step).

The router trains beside the drafter on its detached outputs (it never changes them),
over the partition chosen up front (`partition`; auto = frequency of the training
split's response tokens), so every evaluation can measure tau with the router on as
CORAL serves it. `train router` can refit it on the finished drafter (stage 2).

Every `eval_every` steps (and at the end) `validate.py` measures held-out accuracy per
step and the offline chain tau (k = `eval_k`) on the dev prompts, router on and off; the
best checkpoint by the tau the preset serves with is kept in `best.pt`.

The loop reads nothing back from the device except on logging and evaluation steps.
Resumable: `out/state/latest.pt` (model, optimizer, scheduler, step) is written every
`save_every` steps, at the time limit and at the end (write to a temporary file, then
rename: a crash leaves the previous state); rerunning the same command continues from
it. Multi-GPU: `torchrun --nproc-per-node N` (DDP); data is sharded by rank.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from coral_vllm.bench.results import device_name
from coral_vllm.data.batches import Batch, epoch_batches
from coral_vllm.training.config import PlanChanged, TrainConfig
from coral_vllm.data.shards import (data_fingerprint, load_dev, load_splits,
                                      train_token_counts)
from coral_vllm.data.feature_store import compute_features
from coral_vllm.training.head_loss import chunked_soft_ce
from coral_vllm.training.csra import csra_loss
from coral_vllm.training.model import CoralDrafter
from coral_vllm.data.target import load_target, split_features
from coral_vllm.training.validate import DraftTop1, EvalSplit, validate

STATE_FILE = "state/latest.pt"
BEST_FILE = "best.pt"
METRICS_FILE = "metrics.jsonl"


# ------------------------------------------------------------------ the drafter's passes
def multi_step_forward(drafter, ids_in: torch.Tensor, feat_in: torch.Tensor,
                       num_steps: int, context_alignment: bool = True) -> list[torch.Tensor]:
    """HASS: step 1 reads target features; step j+1 reads step j's detached outputs
    shifted one position right (o_j[t-1] stands in for f_t; position 0 keeps f_0).
    Outputs are the features the head scores; what the next step reads is the hidden
    state vLLM hands on (the same for EAGLE; the pre-norm stream for fused features,
    whose step 1 reads the fused target layers through fc: `drafter.combine`).

    context_alignment (HASS): step j's queries attend to the keys/values that the
    same draft would see at inference (target-feature keys before the draft's start,
    then one key per earlier step); off, every context key is from step j's inputs.
    """
    outs: list[torch.Tensor] = []
    first = drafter.combine(feat_in)
    hidden = first
    past: list[list[tuple[torch.Tensor, torch.Tensor]]] = []  # per step, per layer
    for _ in range(num_steps):
        layers_past = ([[p[i] for p in past] for i in range(len(past[0]))]
                       if context_alignment and past else None)
        out, nxt, kv = drafter.step(ids_in, hidden, past_kv=layers_past)
        if context_alignment:
            past.append(kv)
        outs.append(out)
        hidden = torch.cat([first[:, :1], nxt[:, :-1].detach().to(first.dtype)], dim=1)
    return outs


class MultiStep(torch.nn.Module):
    """The n-step forward as one module call (what DDP wraps: one forward per backward)."""

    def __init__(self, drafter: CoralDrafter, num_steps: int, context_alignment: bool) -> None:
        super().__init__()
        self.drafter, self.num_steps, self.align = drafter, num_steps, context_alignment

    def forward(self, ids_in: torch.Tensor, feat_in: torch.Tensor) -> list[torch.Tensor]:
        return multi_step_forward(self.drafter, ids_in, feat_in, self.num_steps, self.align)


def compute_loss(outs: list[torch.Tensor], feat_tgt: torch.Tensor, loss_pos: torch.Tensor,
                 drafter: CoralDrafter, group_of: torch.Tensor | None, cfg: TrainConfig,
                 generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, stats as device tensors) over the response positions `loss_pos` of the
    flattened [B, S-1] batch; `group_of` (token -> group) trains the router when set.
    A batch without response positions gives a zero loss (every rank must still run
    backward under DDP) and no statistics."""
    if loss_pos.numel() == 0:  # the shape is known on the host: no sync
        touched = sum(o.sum() for o in outs) + sum(p.sum() for p in drafter.router.parameters())
        return touched * 0.0, {}
    preds = torch.stack([o.flatten(0, 1)[loss_pos] for o in outs])       # [steps, N, d]
    tgt = feat_tgt.flatten(0, 1)[loss_pos]                               # [N, d]
    n = preds.shape[1]
    steps = len(outs)
    feat = F.smooth_l1_loss(preds.float(), tgt.float().expand_as(preds),
                            reduction="none").mean(dim=(1, 2))
    topk = cfg.topk_distill if cfg.topk_weight > 0 else 0
    ce, topk_ce, agree, top1 = chunked_soft_ce(preds, tgt, drafter.lm_head.weight, topk=topk)
    weights = cfg.step_weight_decay ** torch.arange(steps, device=preds.device)
    per_step = (cfg.feature_loss_weight * feat + cfg.distill_weight * ce
                + cfg.topk_weight * topk_ce)
    loss = (weights * per_step).sum()
    stats = {"feat": feat.detach(), "ce": ce.detach(), "acc": agree.double() / max(1, n)}
    if topk:
        stats["topk_ce"] = topk_ce.detach()
    if cfg.csra_weight > 0 and steps > 1:
        c = csra_loss(preds, cfg.csra_temperature, cfg.csra_max_positions, generator)
        loss = loss + cfg.csra_weight * c
        stats["csra"] = c.detach()
    if group_of is not None:
        router = drafter.router
        logits = router(preds.detach().flatten(0, 1).to(router.w1.weight.dtype))
        label = group_of[top1].repeat(steps)
        r_loss = F.cross_entropy(logits.float(), label)
        loss = loss + r_loss
        chosen = logits.topk(cfg.top_k_groups, dim=-1).indices
        stats["router_loss"] = r_loss.detach()
        stats["router_recall"] = (chosen == label[:, None]).any(-1).double().mean()
    stats["loss"] = loss.detach()
    return loss, stats


class Meter:
    """Averages device-side statistics between logging steps; one host read per flush."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        for k, v in stats.items():
            v = v.detach().double().flatten()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts[k] = self.counts.get(k, 0) + 1

    def flush(self) -> dict[str, float]:
        if not self.sums:
            return {}
        keys = list(self.sums)
        flat = torch.cat([self.sums[k] for k in keys]).cpu().tolist()
        out, i = {}, 0
        for k in keys:
            n, c = self.sums[k].numel(), self.counts[k]
            vals = flat[i:i + n]
            i += n
            if n == 1:
                out[k] = vals[0] / c
            else:  # per-step statistics: feat1, feat2, ...
                out.update({f"{k}{j + 1}": v / c for j, v in enumerate(vals)})
        self.sums, self.counts = {}, {}
        return out


# ------------------------------------------------------------------ state on disk
def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary name, then rename over `path` (one atomic step)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_state(out: str | Path, name: str = STATE_FILE) -> dict[str, Any] | None:
    path = Path(out) / name
    return torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else None


def init_weights(run: str | Path) -> dict[str, Any]:
    """The drafter a new training phase starts from: another run's best checkpoint (its
    latest state if it has none). Optimizer and schedule start fresh."""
    found = load_state(run, BEST_FILE) or load_state(run)
    if found is None:
        raise FileNotFoundError(f"init_from={run!s}: no {BEST_FILE} or {STATE_FILE} there; "
                                "pass the run directory of a finished `train`")
    return found


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


class Schedule:
    """Which micro-batches every optimizer step reads, for every epoch.

    The training split is cut into `world * grad_accum` shards (sample i -> shard
    i % shards); micro-batch slot s of every step comes from shard s, and this rank runs
    the slots rank * grad_accum ... + grad_accum - 1. So N processes and one process
    accumulating N micro-batches compute the same steps, and every rank needs target
    features for its own shards only. Each epoch has as many steps as the shortest
    shard has batches (the remainder of the others is left out that epoch).
    """

    def __init__(self, lengths: np.ndarray, cfg: TrainConfig, world: int, rank: int) -> None:
        self.shards = world * cfg.grad_accum
        self.mine = list(range(rank * cfg.grad_accum, (rank + 1) * cfg.grad_accum))
        self.members = [np.arange(s, len(lengths), self.shards) for s in range(self.shards)]
        self.lengths, self.cfg = lengths, cfg
        self._epochs: dict[int, list[list[np.ndarray]]] = {}

    def local_samples(self) -> np.ndarray:
        return np.sort(np.concatenate([self.members[s] for s in self.mine]))

    def epoch(self, e: int) -> list[list[np.ndarray]]:
        """[step][slot of this rank] -> sample indices (into the whole split)."""
        if e not in self._epochs:
            per_shard = [
                [self.members[s][b] for b in epoch_batches(
                    self.lengths[self.members[s]], self.cfg.batch_tokens,
                    self.cfg.seed + 1000 * s, e)]
                for s in range(self.shards)]
            steps = min(len(b) for b in per_shard)
            self._epochs = {e: [[per_shard[s][k] for s in self.mine] for k in range(steps)]}
        return self._epochs[e]

    def steps_in(self, e: int) -> int:
        return len(self.epoch(e))


def slot_generators(seed: int, step: int, slot: int, device: torch.device
                    ) -> tuple[torch.Generator, torch.Generator]:
    """(feature noise on `device`, CSRA sampling on the CPU) for one micro-batch slot of
    one step: the same draws whichever rank or accumulation pass runs the slot."""
    s = (seed * 1_000_003 + step) * 1009 + slot
    return (torch.Generator(device=device).manual_seed(s),
            torch.Generator().manual_seed(s + 1))


# ------------------------------------------------------------------ the loop
def train(cfg: TrainConfig, device: str | None = None,
          stop_at_step: int | None = None) -> dict[str, Any]:
    """Runs (or resumes) stage 1; returns {'step', 'total_steps', 'done', 'last', 'best'}.

    `stop_at_step` ends this invocation early (as the time limit does), for chunked runs.
    """
    t0 = time.time()  # the time limit counts loading too
    # batch shapes vary from step to step: growable segments instead of new cudaMallocs
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    rank, world, dev = setup_distributed()
    if device is not None:
        dev = torch.device(device)
    out = Path(cfg.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)  # the same initial drafter on every rank
    use_bf16 = dev.type == "cuda" and cfg.dtype in ("auto", "bfloat16", "bf16")
    log = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)

    # data: this rank's shards of the training split, held-out and dev splits
    train_all, heldout_table = load_splits(cfg.data, cfg.max_len, cfg.router_holdout)
    schedule = Schedule(train_all.lengths, cfg, world, rank)
    per_epoch = [schedule.steps_in(e) for e in range(cfg.epochs)]
    total_steps = min(cfg.max_steps, sum(per_epoch)) if cfg.max_steps else sum(per_epoch)
    state = load_state(out)
    data_id = data_fingerprint(cfg.data)
    if state is not None:
        cfg.check_resumes(state["config"])
        if state.get("data_fingerprint", data_id) != data_id:
            raise PlanChanged(f"{out} was started on other data than {cfg.data} holds now "
                              "(its shards' hashes differ): resume on the same data, or "
                              "pass a new --out.")
        started = state.get("micro_batches", schedule.shards)
        if started != schedule.shards:
            raise PlanChanged(f"{out} was started with {started} micro-batches a step (world "
                              f"size x grad_accum); this command has {world} x "
                              f"{cfg.grad_accum}: pick --grad-accum so the product is {started}.")
    if state is not None and state["step"] >= total_steps:
        log(f"{out}: already trained ({state['step']} steps)")
        return {"step": state["step"], "total_steps": total_steps, "done": True,
                "last": {}, "best": state.get("best", {})}
    target, _, tcfg = load_target(cfg.target, dev, torch.bfloat16 if use_bf16 else torch.float32)
    local = schedule.local_samples()
    table = train_all.subset(local)
    slot_of = {int(s): i for i, s in enumerate(local)}  # whole-split index -> local index
    fused = cfg.fused_layer_ids(tcfg)
    feats = compute_features(target, table, dev, place=cfg.feature_store, fused_layers=fused)
    heldout = dev_split = None
    if rank == 0:
        heldout_table = heldout_table.subset(
            np.arange(min(len(heldout_table), cfg.eval_heldout_samples)))
        heldout = EvalSplit(heldout_table, compute_features(target, heldout_table, dev,
                                                            fused_layers=fused))
        dev_table, prompt_lens = load_dev(cfg.data, cfg.max_len)
        if dev_table is not None:
            dev_split = EvalSplit(dev_table, compute_features(target, dev_table, dev,
                                                              fused_layers=fused),
                                  prompt_lens)
    log(f"data: {len(train_all)} training samples ({table.num_tokens} tokens on this rank), "
        f"{len(heldout_table)} held out, {0 if dev_split is None else len(dev_split.table)} "
        f"dev prompts; features in {time.time() - t0:.0f} s")

    # model: drafter + online router over a fixed partition
    drafter = CoralDrafter(tcfg, cfg.num_groups, cfg.router_act, cfg.num_layers, fused)
    drafter.load_target_heads(target)
    if cfg.init_from_target:
        drafter.init_layer_from_target(target)
    start = state or (init_weights(cfg.init_from) if cfg.init_from else None)
    if start is not None:  # this run's state, or (a new phase) another run's drafter
        drafter.load_state_dict(start["model"], strict=False)
    else:
        drafter.set_partition(drafter.choose_partition(
            cfg.online_partition(), train_token_counts(train_all, tcfg["vocab_size"])))
    del target
    drafter.router.requires_grad_(cfg.router_online)
    drafter.to(dev)
    coral = drafter.coral_config(cfg.top_k_groups)
    group_of = drafter.group_of_token().to(dev) if cfg.router_online else None
    top1 = DraftTop1(drafter.lm_head.weight, drafter.partition.token_order, cfg.num_groups,
                     coral.group_size, cfg.top_k_groups)
    groups = [{"params": [p for n, p in drafter.named_parameters()
                          if p.requires_grad and not n.startswith("router.")]}]
    if cfg.router_online:
        groups.append({"params": list(drafter.router.parameters()), "lr": cfg.router_lr})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas),
                            weight_decay=cfg.weight_decay, fused=dev.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total_steps))
    step, tokens_seen = 0, 0
    best = {"score": -1.0}
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, tokens_seen, best = state["step"], state.get("tokens_seen", 0), state["best"]
        log(f"resuming {out} at step {step}/{total_steps}")
    model: torch.nn.Module = MultiStep(drafter, cfg.num_steps, cfg.context_alignment)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None)
    params = [p for g in groups for p in g["params"]]
    eval_forward = lambda ids, f, n: multi_step_forward(drafter, ids, f, n, True)  # noqa: E731
    select_by = "tau_router" if cfg.serve_router else "tau_dense"

    def evaluate() -> dict[str, Any]:
        drafter.eval()
        res = validate(eval_forward, heldout=heldout, dev=dev_split, top1=top1,
                       router=drafter.router, num_steps=cfg.num_steps, k=cfg.eval_k,
                       device=dev, autocast=use_bf16)
        drafter.train()
        return res

    meter = Meter()
    last: dict[str, Any] = {}
    t_log, tokens_log = time.time(), tokens_seen
    stopped_early = False
    metrics_path = out / METRICS_FILE
    if rank == 0 and state is None:  # which card the rates and curves below come from
        _append(metrics_path, {"run": {"device": device_name(), "world_size": world,
                                       "preset_steps": cfg.num_steps,
                                       "batch_tokens": cfg.batch_tokens}})
    log(f"training {total_steps} steps ({per_epoch[0]} in epoch 1) x {world} rank(s) x "
        f"{cfg.grad_accum} micro-batch(es) of <= {cfg.batch_tokens} tokens")
    while step < total_steps:
        epoch, k = _locate(step, per_epoch)
        for slot, idx in enumerate(schedule.epoch(epoch)[k]):
            batch = Batch.build(table, np.array([slot_of[int(i)] for i in idx])).to(dev)
            rows = batch.rows.to(feats.device)
            last, f = split_features(feats[rows].to(dev, non_blocking=True),
                                     drafter.hidden_size)
            feat_in, feat_tgt = f[:, :-1], last[:, 1:]
            noise_gen, csra_gen = slot_generators(cfg.seed, step, schedule.mine[slot], dev)
            if cfg.feature_noise > 0:
                u = torch.rand(feat_in.shape, generator=noise_gen, device=dev,
                               dtype=feat_in.dtype)
                feat_in = feat_in + (u - 0.5) * cfg.feature_noise
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                outs = model(batch.ids_in, feat_in)
            loss, stats = compute_loss(outs, feat_tgt, batch.loss_pos, drafter, group_of,
                                       cfg, csra_gen)
            last_micro = slot == cfg.grad_accum - 1
            if world > 1 and not last_micro:
                with model.no_sync():
                    (loss / cfg.grad_accum).backward()
            else:
                (loss / cfg.grad_accum).backward()
            meter.add(stats)
            tokens_seen += batch.tokens * world
        stats_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        meter.add({"grad_norm": stats_norm})
        step += 1

        if rank == 0 and (step % cfg.log_every == 0 or step == total_steps):
            row = meter.flush()  # the one host read of a logging step
            now = time.time()
            row.update(step=step, epoch=epoch, lr=sched.get_last_lr()[0],
                       train_tokens=tokens_seen,
                       tokens_per_s=(tokens_seen - tokens_log) / max(1e-9, now - t_log))
            t_log, tokens_log, last = now, tokens_seen, row
            _append(metrics_path, row)
            log(f"step {step}/{total_steps} loss {row['loss']:.3f} acc1 {row.get('acc1', 0):.3f}"
                f" {row['tokens_per_s']:.0f} tok/s")
        evaluating = cfg.eval_every and step % cfg.eval_every == 0 or step == total_steps
        if rank == 0 and evaluating:
            t_eval = time.time()
            res = evaluate()
            res.update(step=step, train_tokens=tokens_seen, eval_s=time.time() - t_eval)
            _append(metrics_path, {"eval": res})
            log("eval " + " ".join(f"{k} {v:.3f}" for k, v in res.items()
                                   if isinstance(v, float)))
            score = res.get(select_by, res.get("heldout_acc1", 0.0))
            if score > best["score"]:
                best = {"score": score, "step": step, "metric": select_by, **res}
                atomic_save({"model": drafter.drafter_state_dict(), "eval": res, "step": step,
                             "config": cfg.to_dict(), "target_config": drafter.cfg},
                            out / BEST_FILE)
            t_log += time.time() - t_eval  # evaluation time is not training throughput
        out_of_time = cfg.time_limit_min > 0 and time.time() - t0 > cfg.time_limit_min * 60
        if world > 1 and cfg.time_limit_min > 0:  # every rank must stop at the same step
            flag = torch.tensor([float(out_of_time)], device=dev)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            out_of_time = bool(flag.item())
        chunk_end = stop_at_step is not None and step >= stop_at_step
        if step % cfg.save_every == 0 or step == total_steps or out_of_time or chunk_end:
            if rank == 0:
                _save(out, drafter, opt, sched, step, total_steps, tokens_seen, best, cfg,
                      data_id, world)
        if (out_of_time or chunk_end) and step < total_steps:
            stopped_early = True
            break
    if stopped_early:
        log(f"stopped at step {step}/{total_steps}; rerun the same command to resume.")
    else:
        log(f"stage 1 done: {step} steps, best {best.get('metric')} {best['score']:.3f} "
            f"at step {best.get('step')}; next: `train export --run {out}`.")
    if world > 1:
        dist.barrier()
    return {"step": step, "total_steps": total_steps, "done": step >= total_steps,
            "last": last, "best": best}


def _locate(step: int, per_epoch: list[int]) -> tuple[int, int]:
    """(epoch, step within it) of a global step."""
    for e, n in enumerate(per_epoch):
        if step < n:
            return e, step
        step -= n
    raise IndexError("step past the last epoch")


def _append(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _save(out: Path, drafter: CoralDrafter, opt, sched, step: int, total: int,
          tokens_seen: int, best: dict[str, Any], cfg: TrainConfig, data_id: str,
          world: int) -> None:
    """No RNG state: every random draw is seeded by (seed, step, slot), so any world size
    resumes this state to the same steps."""
    atomic_save({"model": drafter.drafter_state_dict(), "optimizer": opt.state_dict(),
                 "scheduler": sched.state_dict(), "step": step, "total_steps": total,
                 "tokens_seen": tokens_seen, "best": best, "config": cfg.to_dict(),
                 "target_config": drafter.cfg, "data_fingerprint": data_id,
                 "micro_batches": cfg.grad_accum * world},
                out / STATE_FILE)
    cfg.save(out / "train_config.json")
