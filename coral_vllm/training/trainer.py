"""Stage 1: train the drafter (EAGLE / HASS multi-step / CORAL's CSRA), validated as it goes.

One optimizer step:
    f = target features, computed once for the whole split (data/feature_store.py), or
        for each micro-batch as it is trained on (feature_store="online")
    position t: input (f_t + noise, x_{t+1}), target f_{t+1} (and lm_head(f_{t+1}));
              with fused_layers the input is the fused layers' states at t instead
    n drafter steps, each reading the features the one before predicted (multi_step.py)
    loss = feature regression + distillation + CSRA + the online router's CE (losses.py)
on positions whose predicted token x_{t+2} is a response token.

The router trains beside the drafter on its detached outputs (it never changes them),
over the partition chosen up front (`partition`; auto = frequency of the training
split's response tokens), so every evaluation can measure tau with the router on as
CORAL serves it. `train router` can refit it on the finished drafter (stage 2).

Every `eval_every` steps (and at the end) `validate.py` measures held-out accuracy per
step and the offline chain tau (k = `eval_k`) on the dev prompts, router on and off; the
best checkpoint by the tau the preset serves with is kept in `best.pt`.

The loop reads nothing back from the device except on logging and evaluation steps (and,
with feature_store="online", once per micro-batch inside the target's transformers
forward: `feature_store.features_of_rows`).
Resumable: the run directory's state (run_dir.py) is written every `save_every` steps,
at the time limit and at the end; rerunning the same command continues from it.
Multi-GPU: `torchrun --nproc-per-node N` (DDP); data is sharded by rank (schedule.py).
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from coral_vllm.data.batches import Batch, TokenTable, to_device
from coral_vllm.data.feature_store import compute_features, features_of_rows
from coral_vllm.data.shards import data_fingerprint, load_dev, load_splits, train_token_counts
from coral_vllm.data.target import load_target, split_features
from coral_vllm.runtime.device import device_name
from coral_vllm.training.config import TrainConfig
from coral_vllm.training.losses import compute_loss
from coral_vllm.training.model import CoralDrafter
from coral_vllm.training.multi_step import MultiStep, multi_step_forward
from coral_vllm.training.profiling import StepProfiler
from coral_vllm.training.run_dir import (append_metrics, check_resume, init_weights,
                                         load_state, save_best, save_state)
from coral_vllm.training.schedule import Schedule, locate, lr_lambda, slot_generators
from coral_vllm.training.validate import DraftTop1, EvalSplit, validate


@dataclasses.dataclass(frozen=True)
class Run:
    """This process's part of a run: the settings, the run directory, the rank, the device."""
    cfg: TrainConfig
    out: Path
    rank: int
    world: int
    device: torch.device
    bf16: bool  # autocast: on CUDA unless the settings ask for float32

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)


@dataclasses.dataclass
class Features:
    """What this rank trains and (rank 0) validates on, with the target's features."""
    table: TokenTable          # this rank's training samples
    rows: dict[int, int]       # whole-split sample index -> its row in `table`
    store: torch.Tensor | None  # their target features; None: `target` computes them
    heldout: EvalSplit | None  # rank 0 only
    dev: EvalSplit | None      # rank 0 only, if the data has dev prompts
    # feature_store="online" only (elsewhere the target is freed once the stores exist):
    target: torch.nn.Module | None = None
    fused: list[int] | None = None  # target layers whose states follow its last one

    def of_batch(self, host: Batch, batch: Batch, device: torch.device) -> torch.Tensor:
        """[B, S, width] target features of a batch's rows (`host`: as built, `batch`: on
        the device) on `device`: the store's, or (online) the target's run on its tokens,
        the same values (`features_of_rows` computes the store too)."""
        if self.store is None:
            return features_of_rows(self.target, self.table, host.rows.numpy(), device,
                                    self.fused)
        if self.store.device.type == device.type:
            return self.store[batch.rows]
        # a host store: gather with the host's rows (reading the device's back would wait
        # on it), copy from pinned memory
        return to_device(self.store[host.rows], device)


def train(cfg: TrainConfig, device: str | None = None,
          stop_at_step: int | None = None) -> dict[str, Any]:
    """Runs (or resumes) stage 1; returns {'step', 'total_steps', 'done', 'last', 'best'}.

    `stop_at_step` ends this invocation early (as the time limit does), for chunked runs.
    """
    t0 = time.time()  # the time limit counts loading too
    run = start_run(cfg, device)
    train_all, heldout_table = load_splits(cfg.data, cfg.max_len, cfg.router_holdout)
    schedule = Schedule(train_all.lengths, cfg, run.world, run.rank)
    per_epoch = schedule.steps_per_epoch()
    total_steps = min(cfg.max_steps, sum(per_epoch)) if cfg.max_steps else sum(per_epoch)
    data_id = data_fingerprint(cfg.data)
    state = load_state(run.out)
    if state is not None:
        check_resume(state, cfg, data_id, schedule.shards, run.world)
        if state["step"] >= total_steps:
            run.log(f"{run.out}: already trained ({state['step']} steps)")
            return {"step": state["step"], "total_steps": total_steps, "done": True,
                    "last": {}, "best": state.get("best", {})}
    drafter, feats = load_drafter_and_features(run, schedule, train_all, heldout_table,
                                               state, t0)
    opt, sched, params = make_optimizer(cfg, drafter, run.device, total_steps, state)
    step, tokens_seen, best = progress(run, state, total_steps)
    model = distributed(MultiStep(drafter, cfg.num_steps, cfg.context_alignment), run)
    group_of = drafter.group_of_token().to(run.device) if cfg.router_online else None
    meter, rate, last = Meter(), Throughput(tokens_seen), {}
    profiler = StepProfiler(run.out, cfg.profile_steps if run.rank == 0 else 0, run.device)
    announce(run, state is None, total_steps, per_epoch)
    while step < total_steps:
        epoch, k = locate(step, per_epoch)
        for slot, idx in enumerate(schedule.epoch(epoch)[k]):
            stats, tokens = micro_step(run, model, drafter, feats, idx, step,
                                       schedule.mine[slot], group_of)
            meter.add(stats)
            tokens_seen += tokens
        meter.add({"grad_norm": optimizer_step(opt, sched, params, cfg.grad_clip)})
        step += 1
        profiler.step()
        if run.rank == 0 and (step % cfg.log_every == 0 or step == total_steps):
            last = log_step(run, meter, rate, step, total_steps, epoch, sched, tokens_seen)
        if run.rank == 0 and (cfg.eval_every and step % cfg.eval_every == 0
                              or step == total_steps):
            best = evaluate(run, drafter, feats, rate, step, tokens_seen, best)
        stop = out_of_time(run, t0) or (stop_at_step is not None and step >= stop_at_step)
        if run.rank == 0 and (step % cfg.save_every == 0 or step == total_steps or stop):
            save_state(run.out, drafter, opt, sched, step, total_steps, tokens_seen, best,
                       cfg, data_id, run.world)
        if stop and step < total_steps:
            break
    finish(run, step, total_steps, best)
    return {"step": step, "total_steps": total_steps, "done": step >= total_steps,
            "last": last, "best": best}


# ------------------------------------------------------------------ setting up
def start_run(cfg: TrainConfig, device: str | None) -> Run:
    """Joins the process group under torchrun, picks the device, makes the run directory
    and seeds torch, so every rank builds the same initial drafter."""
    # batch shapes vary from step to step: growable segments instead of new cudaMallocs
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if device is not None:
        dev = torch.device(device)
    out = Path(cfg.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    return Run(cfg, out, rank, world, dev,
               dev.type == "cuda" and cfg.dtype in ("auto", "bfloat16", "bf16"))


def load_drafter_and_features(run: Run, schedule: Schedule, train_all: TokenTable,
                              heldout: TokenTable, state: dict[str, Any] | None,
                              t0: float) -> tuple[CoralDrafter, Features]:
    """The target's features of this rank's samples (and rank 0's validation splits),
    then the drafter: its frozen heads from the target, its weights from the run's state
    (or another run's, `init_from`), else a new partition for the online router."""
    cfg, dev = run.cfg, run.device
    dtype = torch.bfloat16 if run.bf16 else torch.float32
    target, _, tcfg = load_target(cfg.target, dev, dtype)
    fused = cfg.fused_layer_ids(tcfg)
    feats = compute_split_features(run, target, train_all, heldout, schedule, fused)
    run.log(f"data: {len(train_all)} training samples ({feats.table.num_tokens} tokens on "
            f"this rank), {0 if feats.heldout is None else len(feats.heldout.table)} held out, "
            f"{0 if feats.dev is None else len(feats.dev.table)} dev prompts; features in "
            f"{time.time() - t0:.0f} s")
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
    drafter.router.requires_grad_(cfg.router_online)
    return drafter.to(dev), feats


def compute_split_features(run: Run, target, train_all: TokenTable, heldout: TokenTable,
                           schedule: Schedule, fused: list[int] | None) -> Features:
    """Target features of this rank's training samples (with feature_store="online", the
    target that computes them per micro-batch instead); on rank 0 also the features of
    the first `eval_heldout_samples` held-out samples and of the dev prompts, computed
    once either way (they are small)."""
    cfg, dev = run.cfg, run.device
    local = schedule.local_samples()
    table = train_all.subset(local)
    rows = {int(s): i for i, s in enumerate(local)}
    online = cfg.feature_store == "online"
    store = None if online else compute_features(target, table, dev, place=cfg.feature_store,
                                                 fused_layers=fused)
    kept = {"target": target, "fused": fused} if online else {}
    if run.rank != 0:
        return Features(table, rows, store, None, None, **kept)
    heldout = heldout.subset(np.arange(min(len(heldout), cfg.eval_heldout_samples)))
    held = EvalSplit(heldout, compute_features(target, heldout, dev, fused_layers=fused))
    dev_table, prompt_lens = load_dev(cfg.data, cfg.max_len)
    dev_split = None if dev_table is None else EvalSplit(
        dev_table, compute_features(target, dev_table, dev, fused_layers=fused), prompt_lens)
    return Features(table, rows, store, held, dev_split, **kept)


def make_optimizer(cfg: TrainConfig, drafter: CoralDrafter, dev: torch.device,
                   total_steps: int, state: dict[str, Any] | None
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR,
                              list[torch.nn.Parameter]]:
    """AdamW over the drafter's trainable weights (the router at its own rate) and the
    warm-up + cosine schedule, both restored from `state` on a resume; and the
    parameters whose gradient norm is clipped."""
    groups = [{"params": [p for n, p in drafter.named_parameters()
                          if p.requires_grad and not n.startswith("router.")]}]
    if cfg.router_online:
        groups.append({"params": list(drafter.router.parameters()), "lr": cfg.router_lr})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas),
                            weight_decay=cfg.weight_decay, fused=dev.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total_steps))
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
    return opt, sched, [p for g in groups for p in g["params"]]


def progress(run: Run, state: dict[str, Any] | None, total_steps: int
             ) -> tuple[int, int, dict[str, Any]]:
    """(step, training tokens seen, best evaluation) where the run stands."""
    if state is None:
        return 0, 0, {"score": -1.0}
    run.log(f"resuming {run.out} at step {state['step']}/{total_steps}")
    return state["step"], state.get("tokens_seen", 0), state["best"]


def distributed(model: torch.nn.Module, run: Run) -> torch.nn.Module:
    """`model` under DDP when several ranks train (one forward per backward)."""
    if run.world == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[run.device.index] if run.device.type == "cuda" else None)


def announce(run: Run, new: bool, total_steps: int, per_epoch: list[int]) -> None:
    """The plan, and (a new run) which card the rates and curves in the metrics are from."""
    cfg = run.cfg
    if run.rank == 0 and new:
        append_metrics(run.out, {"run": {"device": device_name(), "world_size": run.world,
                                         "preset_steps": cfg.num_steps,
                                         "batch_tokens": cfg.batch_tokens}})
    run.log(f"training {total_steps} steps ({per_epoch[0]} in epoch 1) x {run.world} rank(s) "
            f"x {cfg.grad_accum} micro-batch(es) of <= {cfg.batch_tokens} tokens")


# ------------------------------------------------------------------ one step
def micro_step(run: Run, model: torch.nn.Module, drafter: CoralDrafter, feats: Features,
               idx: np.ndarray, step: int, slot: int, group_of: torch.Tensor | None
               ) -> tuple[dict[str, torch.Tensor], int]:
    """Forward and backward of one micro-batch (samples `idx` of the whole split, slot
    `slot` of the step); (its statistics on the device, the tokens all ranks read)."""
    cfg, dev = run.cfg, run.device
    host = Batch.build(feats.table, np.array([feats.rows[int(i)] for i in idx]))
    batch = host.to(dev)
    last, f = split_features(feats.of_batch(host, batch, dev), drafter.hidden_size)
    feat_in, feat_tgt = f[:, :-1], last[:, 1:]
    noise_gen, csra_gen = slot_generators(cfg.seed, step, slot, dev)
    if cfg.feature_noise > 0:
        u = torch.rand(feat_in.shape, generator=noise_gen, device=dev, dtype=feat_in.dtype)
        feat_in = feat_in + (u - 0.5) * cfg.feature_noise
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=run.bf16):
        outs = model(batch.ids_in, feat_in)
    loss, stats = compute_loss(outs, feat_tgt, batch.loss_pos, drafter, group_of, cfg,
                               csra_gen)
    if run.world > 1 and slot % cfg.grad_accum != cfg.grad_accum - 1:
        with model.no_sync():  # DDP all-reduces on this rank's last slot of the step
            (loss / cfg.grad_accum).backward()
    else:
        (loss / cfg.grad_accum).backward()
    return stats, batch.tokens * run.world


def optimizer_step(opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LambdaLR,
                   params: list[torch.nn.Parameter], grad_clip: float) -> torch.Tensor:
    """Clips, steps and clears the gradients; the norm before clipping (on the device)."""
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return norm


# ------------------------------------------------------------------ logging, validation
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


class Throughput:
    """Training tokens per second between logging steps, evaluation time left out."""

    def __init__(self, tokens: int) -> None:
        self.time, self.tokens = time.time(), tokens

    def rate(self, tokens: int) -> float:
        """Since the last call (or the start); restarts the count."""
        now = time.time()
        rate = (tokens - self.tokens) / max(1e-9, now - self.time)
        self.time, self.tokens = now, tokens
        return rate

    def leave_out(self, seconds: float) -> None:
        self.time += seconds


def log_step(run: Run, meter: Meter, rate: Throughput, step: int, total_steps: int,
             epoch: int, sched: torch.optim.lr_scheduler.LambdaLR, tokens_seen: int
             ) -> dict[str, Any]:
    """The averages since the last logging step (the one host read), to the metrics."""
    row = meter.flush()
    row.update(step=step, epoch=epoch, lr=sched.get_last_lr()[0], train_tokens=tokens_seen,
               tokens_per_s=rate.rate(tokens_seen))
    append_metrics(run.out, row)
    run.log(f"step {step}/{total_steps} loss {row['loss']:.3f} acc1 {row.get('acc1', 0):.3f}"
            f" {row['tokens_per_s']:.0f} tok/s")
    return row


def evaluate(run: Run, drafter: CoralDrafter, feats: Features, rate: Throughput, step: int,
             tokens_seen: int, best: dict[str, Any]) -> dict[str, Any]:
    """Validates (`validate.validate`), logs the result and keeps the drafter in best.pt
    if it beats `best` by the tau the preset serves with; returns the best so far."""
    cfg, t_eval = run.cfg, time.time()
    c = drafter.coral_config(cfg.top_k_groups)
    top1 = DraftTop1(drafter.lm_head.weight, drafter.partition.token_order, c)
    drafter.eval()
    res = validate(lambda ids, f, n: multi_step_forward(drafter, ids, f, n, True),
                   heldout=feats.heldout, dev=feats.dev, top1=top1, router=drafter.router,
                   num_steps=cfg.num_steps, k=cfg.eval_k, device=run.device,
                   autocast=run.bf16)
    drafter.train()
    res.update(step=step, train_tokens=tokens_seen, eval_s=time.time() - t_eval)
    append_metrics(run.out, {"eval": res})
    run.log("eval " + " ".join(f"{k} {v:.3f}" for k, v in res.items() if isinstance(v, float)))
    select_by = "tau_router" if cfg.serve_router else "tau_dense"
    score = res.get(select_by, res.get("heldout_acc1", 0.0))
    if score > best["score"]:
        best = {"score": score, "step": step, "metric": select_by, **res}
        save_best(run.out, drafter, res, step, cfg)
    rate.leave_out(time.time() - t_eval)
    return best


def out_of_time(run: Run, t0: float) -> bool:
    """Past the time limit; agreed by every rank, so that all stop at the same step."""
    limit = run.cfg.time_limit_min
    late = limit > 0 and time.time() - t0 > limit * 60
    if run.world > 1 and limit > 0:
        flag = torch.tensor([float(late)], device=run.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        late = bool(flag.item())
    return late


def finish(run: Run, step: int, total_steps: int, best: dict[str, Any]) -> None:
    """Says how the run stands (done, or stopped early: rerun to resume); ranks wait."""
    if step < total_steps:
        run.log(f"stopped at step {step}/{total_steps}; rerun the same command to resume.")
    else:
        run.log(f"stage 1 done: {step} steps, best {best.get('metric')} {best['score']:.3f} "
                f"at step {best.get('step')}; next: `train export --run {run.out}`.")
    if run.world > 1:
        dist.barrier()
