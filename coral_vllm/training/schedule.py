"""What each optimizer step reads and at which learning rate: the plan a run follows to its
end, across ranks, accumulation passes and resumes.

Every random draw of a step (feature noise, CSRA's sampled positions) is seeded by
(seed, step, micro-batch slot) rather than carried in a generator, so a run resumed on
any world size draws what it would have drawn without stopping.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from coral_vllm.data.batches import epoch_batches
from coral_vllm.training.config import TrainConfig


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

    def steps_per_epoch(self) -> list[int]:
        """Optimizer steps of each of the run's epochs."""
        return [self.steps_in(e) for e in range(self.cfg.epochs)]


def slot_generators(seed: int, step: int, slot: int, device: torch.device
                    ) -> tuple[torch.Generator, torch.Generator]:
    """(feature noise on `device`, CSRA sampling on the CPU) for one micro-batch slot of
    one step: the same draws whichever rank or accumulation pass runs the slot."""
    s = (seed * 1_000_003 + step) * 1009 + slot
    return (torch.Generator(device=device).manual_seed(s),
            torch.Generator().manual_seed(s + 1))


def locate(step: int, per_epoch: list[int]) -> tuple[int, int]:
    """(epoch, step within it) of a global step."""
    for e, n in enumerate(per_epoch):
        if step < n:
            return e, step
        step -= n
    raise IndexError("step past the last epoch")


def lr_lambda(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up over `warmup_steps`, then cosine decay to lr * min_lr_ratio at the
    last step (LambdaLR's factor of the base rate)."""
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        cos = 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cos
    return f
