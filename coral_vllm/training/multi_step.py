"""HASS's multi-step forward: the drafter runs n steps over a batch, each step reading the
features the one before it predicted, as it does when it drafts a chain.

Training (`trainer`), validation (`validate.chain_tau` reads every round of chain
drafting off one such forward), the router stage and the offline evaluation all run the
drafter through `multi_step_forward`.
"""

from __future__ import annotations

import torch

from coral_vllm.training.model import CoralDrafter


def multi_step_forward(drafter: CoralDrafter, ids_in: torch.Tensor, feat_in: torch.Tensor,
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
