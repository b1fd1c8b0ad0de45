"""A training run's directory: what `train` writes there and reads back to resume.

    RUN/state/latest.pt     model, optimizer, schedule, step, tokens seen, best so far,
                            the config and data fingerprint the run started with
    RUN/best.pt             the drafter with the best validation tau, and that evaluation
    RUN/metrics.jsonl       one row per logging step and per evaluation
    RUN/train_config.json   the run's settings (`TrainConfig`)
    RUN/router.pt           stage 2's partition and router (`router_train`), if it ran,
    RUN/router_report.json  and what it measured
    RUN/router_sweep.json   stage 2 over several group counts (`router_sweep`): the table
    RUN/router_sweep/NAME/  and each setting's router.pt + router_report.json

Checkpoints are written to a temporary name and renamed over the old one, so a crash
leaves the previous state. No RNG state is kept: every random draw is seeded by (seed,
step, slot) (`schedule.slot_generators`), so any world size resumes a state to the same
steps.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from coral_vllm.training.config import PlanChanged, TrainConfig
from coral_vllm.training.model import CoralDrafter

STATE_FILE = "state/latest.pt"
BEST_FILE = "best.pt"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "train_config.json"
ROUTER_FILE = "router.pt"
ROUTER_REPORT_FILE = "router_report.json"
SWEEP_FILE = "router_sweep.json"
SWEEP_DIR = "router_sweep"


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary name, then rename over `path` (one atomic step)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_state(out: str | Path, name: str = STATE_FILE) -> dict[str, Any] | None:
    path = Path(out) / name
    return torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else None


def swept_router_file(run: str | Path) -> Path:
    """The router.pt of the setting the run's router sweep chose (`train export
    --router-sweep`); its path is stored relative to the run, which travels."""
    path = Path(run) / SWEEP_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run}: no {SWEEP_FILE}; run `coral-vllm train router "
                                f"--out {run} --sweep-groups N [N ...]` first.")
    chosen = Path(run) / json.loads(path.read_text())["chosen"]["router"]
    if not chosen.is_file():  # else the export would quietly take another router
        raise FileNotFoundError(f"{chosen}: the router {SWEEP_FILE} chose is missing; "
                                "rerun the sweep")
    return chosen


def init_weights(run: str | Path) -> dict[str, Any]:
    """The drafter a new training phase starts from: another run's best checkpoint (its
    latest state if it has none). Optimizer and schedule start fresh."""
    found = load_state(run, BEST_FILE) or load_state(run)
    if found is None:
        raise FileNotFoundError(f"init_from={run!s}: no {BEST_FILE} or {STATE_FILE} there; "
                                "pass the run directory of a finished `train`")
    return found


def check_resume(state: dict[str, Any], cfg: TrainConfig, data_id: str,
                 micro_batches: int, world: int) -> None:
    """Raises PlanChanged, naming the fix, where this command would not continue the
    run's plan: other settings, other data, or another number of micro-batches a step."""
    out = cfg.out
    cfg.check_resumes(state["config"])
    if state.get("data_fingerprint", data_id) != data_id:
        raise PlanChanged(f"{out} was started on other data than {cfg.data} holds now "
                          "(its shards' hashes differ): resume on the same data, or "
                          "pass a new --out.")
    started = state.get("micro_batches", micro_batches)
    if started != micro_batches:
        raise PlanChanged(f"{out} was started with {started} micro-batches a step (world "
                          f"size x grad_accum); this command has {world} x "
                          f"{cfg.grad_accum}: pick --grad-accum so the product is {started}.")


def save_state(out: Path, drafter: CoralDrafter, opt: torch.optim.Optimizer,
               sched: torch.optim.lr_scheduler.LRScheduler, step: int, total: int,
               tokens_seen: int, best: dict[str, Any], cfg: TrainConfig, data_id: str,
               world: int) -> None:
    """The resumable state, and the run's settings beside it."""
    atomic_save({"model": drafter.drafter_state_dict(), "optimizer": opt.state_dict(),
                 "scheduler": sched.state_dict(), "step": step, "total_steps": total,
                 "tokens_seen": tokens_seen, "best": best, "config": cfg.to_dict(),
                 "target_config": drafter.cfg, "data_fingerprint": data_id,
                 "micro_batches": cfg.grad_accum * world},
                out / STATE_FILE)
    cfg.save(out / CONFIG_FILE)


def save_best(out: Path, drafter: CoralDrafter, evaluation: dict[str, Any], step: int,
              cfg: TrainConfig) -> None:
    atomic_save({"model": drafter.drafter_state_dict(), "eval": evaluation, "step": step,
                 "config": cfg.to_dict(), "target_config": drafter.cfg},
                out / BEST_FILE)


def append_metrics(out: Path, row: dict[str, Any]) -> None:
    with open(out / METRICS_FILE, "a") as f:
        f.write(json.dumps(row) + "\n")
