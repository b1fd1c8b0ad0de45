"""Training settings: one dataclass, saved next to every checkpoint.

Defaults follow HASS (AdamW (0.9, 0.95), grad clip 0.5, uniform feature noise, SmoothL1
feature loss weight 1.0 + 0.1 soft cross-entropy, n = 3 steps). What the CORAL paper
leaves open (CSRA weight and temperature, router label, partition) is a setting here,
marked [choice] below. Presets give the three compared recipes with the same data and
budget: `eagle` (1 step), `hass` (3 steps), `coral` (3 steps + CSRA); each trains a router
beside it, and only `coral` serves with it (`serve_router`), so only its best checkpoint
is chosen by the tau with the router on.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from coral_vllm.format.config import (NUM_GROUPS, PARTITION_STRATEGIES, ROUTER_ACTIVATIONS,
                                      TOP_K_GROUPS)

# how the distillation loss does its softmax work (training/losses.py, soft_ce_impl)
SOFT_CE_IMPLS = ("auto", "torch", "triton")

PRESETS: dict[str, dict[str, Any]] = {
    "eagle": {"num_steps": 1, "csra_weight": 0.0, "serve_router": False},
    "hass": {"num_steps": 3, "csra_weight": 0.0, "serve_router": False},
    "coral": {"num_steps": 3, "csra_weight": 0.1, "serve_router": True},
}


# What a resumed run may change: where things are, how often it logs, validates and
# saves, its time limit, where its features live, and how a step's micro-batches are
# spread over ranks and accumulation (the trainer checks that their number, world size x
# grad_accum, stays). The rest is the run's plan (budget, schedule, recipe), fixed when
# the run starts so that a run spread over many calls and hosts follows one learning-rate
# schedule to its end.
RESUMABLE_CHANGES = frozenset({"target", "data", "out", "time_limit_min", "log_every",
                               "eval_every", "save_every", "feature_store", "grad_accum",
                               "profile_steps", "soft_ce"})


class PlanChanged(ValueError):
    """A resume asked for a different plan (or data) than the run started with."""


@dataclasses.dataclass
class TrainConfig:
    # paths
    target: str = ""                 # HF model directory of the target
    data: str = ""                   # directory written by `train data`
    out: str = "runs/coral"          # run directory: state/, metrics.jsonl, router.pt
    # budget (whichever ends first); a run stopped by time_limit_min resumes where it was
    epochs: int = 1
    max_steps: int = 0               # optimizer steps; 0 = epochs decide
    time_limit_min: float = 0.0      # 0 = no limit; else save + exit after this many minutes
    # optimisation
    lr: float = 1e-4
    min_lr_ratio: float = 0.1        # cosine decay from lr to lr * min_lr_ratio
    warmup_steps: int = 50
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float = 0.5
    batch_tokens: int = 32768        # padded tokens per micro-batch (length-bucketed)
    grad_accum: int = 1              # micro-batches per rank per optimizer step
    max_len: int = 2048              # tokens per sample (longer ones are cut)
    seed: int = 0
    dtype: str = "auto"              # auto: bf16 autocast on CUDA, float32 on CPU
    # EAGLE/HASS losses
    num_steps: int = 3               # HASS multi-step n (EAGLE = 1)
    context_alignment: bool = True  # HASS harmonized context (keys/values per step)
    step_weight_decay: float = 1.0   # loss weight of step j is step_weight_decay ** (j-1)
    feature_noise: float = 0.2       # step-1 input noise (U(0,1) - 0.5) * feature_noise
    feature_loss_weight: float = 1.0
    distill_weight: float = 0.1
    # HASS's second phase: distil the target's top-K tokens (K = 10 in HASS)
    topk_distill: int = 10
    topk_weight: float = 0.0         # 0: off (phase 1); HASS phase 2 turns it on
    # CSRA [choice: weight, temperature, negatives]
    csra_weight: float = 0.1
    csra_temperature: float = 0.1
    csra_max_positions: int = 512    # positions sampled per batch (bounds the n^2 matrix)
    csra_negatives: str = "all"      # all other positions, or "other-token": not those
                                     # whose target top-1 is the same token
    # drafter shape and init
    num_layers: int = 1              # decoder layers (EAGLE: 1; later ones have an input norm)
    fused_layers: str = ""           # EAGLE-3-style input: "" = the last hidden state (EAGLE),
                                     # "auto" = vLLM's Llama default (2, N/2, N-3), or "2,15,27"
    init_from_target: bool = False   # copy the target's last N layers into the drafter's
    init_from: str = ""              # a run directory: start from its best drafter (phase 2)
    # target features of the training split: computed once per run and kept on the device
    # or the host ("auto": the device if they fit), or "online": none kept, the target
    # runs on every micro-batch (for data whose store neither can hold)
    feature_store: str = "auto"      # auto | device | host | online
    # the distillation loss's softmax work: auto = the Triton kernels on CUDA without a
    # top-K term (kernels/soft_ce.py), torch = the plain path (a fallback if a card's
    # `bench soft-ce --check` fails)
    soft_ce: str = "auto"            # auto | torch | triton
    # logging / validation / checkpoints
    log_every: int = 10
    eval_every: int = 0              # optimizer steps between validations (0: at the end)
    eval_k: int = 5                  # chain length of the offline tau on the dev prompts
    eval_heldout_samples: int = 400  # held-out samples the accuracy is measured on
    serve_router: bool = True        # best checkpoint by tau with the router on (else dense)
    save_every: int = 200            # optimizer steps between resumable checkpoints
    profile_steps: int = 0           # profile this many steps (after 3 warm ones) into
                                     # RUN/profile.txt (training/profiling.py); 0: off
    # router: trained beside the drafter (online) and/or refit in stage 2
    num_groups: int = NUM_GROUPS
    top_k_groups: int = TOP_K_GROUPS
    router_online: bool = True       # train the router on the drafter's detached outputs
    partition: str = "auto"          # stage 2: auto = best held-out recall of contiguous /
                                     # frequency / cluster; online: auto = frequency
    router_act: str = "silu"
    router_label: str = "ce"         # ce: group of target top-1; kl: group-summed target probs
    router_epochs: int = 5
    router_lr: float = 1e-3
    router_batch_size: int = 1024
    router_max_tokens: int = 200_000  # drafter features collected for router training
    router_holdout: float = 0.1      # data without a held-out split: hold out the last 10%

    def __post_init__(self) -> None:
        """Bad values fail here, naming the setting, before anything is loaded."""
        choices = {"feature_store": ("auto", "device", "host", "online"),
                   "partition": ("auto", *PARTITION_STRATEGIES),
                   "router_label": ("ce", "kl"), "router_act": ROUTER_ACTIVATIONS,
                   "dtype": ("auto", "bfloat16", "bf16", "float32"),
                   "csra_negatives": ("all", "other-token"),
                   "soft_ce": SOFT_CE_IMPLS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}: choose one of {allowed}")
        positive = ("batch_tokens", "grad_accum", "num_steps", "max_len", "num_layers",
                    "num_groups", "top_k_groups", "eval_k", "log_every", "save_every",
                    "epochs")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.fused_layers not in ("", "auto"):
            try:
                [int(x) for x in self.fused_layers.split(",")]
            except ValueError:
                raise ValueError(f"fused_layers={self.fused_layers!r}: give '', 'auto' or "
                                 "comma-separated target layer ids, e.g. '2,15,27'") from None
        if self.top_k_groups > self.num_groups:
            raise ValueError(f"top_k_groups={self.top_k_groups} > num_groups="
                             f"{self.num_groups}: the router picks k of the groups")

    def fused_layer_ids(self, target_config: dict[str, Any]) -> list[int] | None:
        """The target layers the drafter reads (None: EAGLE's last hidden state)."""
        from coral_vllm.format.drafter_config import check_fused_layers, default_fused_layers

        if not self.fused_layers:
            return None
        ids = (default_fused_layers(target_config["num_hidden_layers"])
               if self.fused_layers == "auto"
               else [int(x) for x in self.fused_layers.split(",")])
        return check_fused_layers(ids, target_config)

    def online_partition(self) -> str:
        """The partition the online router trains over (it cannot compare several)."""
        return "frequency" if self.partition == "auto" else self.partition

    @classmethod
    def from_preset(cls, name: str, **kw: Any) -> "TrainConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **kw})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def check_resumes(self, started: dict[str, Any]) -> None:
        """Raises PlanChanged naming every plan setting that differs from `started` (the
        config the run was started with)."""
        old, new = TrainConfig.from_dict(started).to_dict(), self.to_dict()
        diff = [k for k in new if k not in RESUMABLE_CHANGES and new[k] != old[k]]
        if diff:
            raise PlanChanged(
                f"{self.out} was started with "
                + ", ".join(f"{k}={old[k]!r}" for k in diff) + "; this command asks "
                + ", ".join(f"{k}={new[k]!r}" for k in diff) + ". A run's plan is fixed "
                "when it starts: resume with the settings in its train_config.json (only "
                f"{', '.join(sorted(RESUMABLE_CHANGES))} may change), or pass a new --out.")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))
