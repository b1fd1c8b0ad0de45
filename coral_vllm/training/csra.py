"""CORAL's Cross-Step Representation Alignment: an InfoNCE loss across HASS steps.

The drafter's output features for one position at different training steps should
agree (they predict the same next feature), and differ from other positions'. The
paper leaves temperature, weight, pair choice and negatives open; the choices here are
settings in TrainConfig (`csra_*`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def csra_loss(features: torch.Tensor, temperature: float = 0.1,
              max_positions: int | None = None,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """InfoNCE over the drafter's output features across steps.

    `features` [n_steps, N, d]: output of step j at position p. For a query (i, p) each
    (j, p) with j != i is a positive; every (j', p') with p' != p is a negative.
    Per (query, positive) pair:
        -log( exp(s(q, f+)/T) / (exp(s(q, f+)/T) + sum_neg exp(s(q, f-)/T)) ),
    s = cosine similarity; averaged over all pairs. Zero when steps agree and other
    positions are far; 0 (no signal) with a single step. At most `max_positions`
    positions are sampled, bounding the (n N)^2 similarity matrix.
    """
    n, num, _ = features.shape
    if n < 2 or num < 2:
        return features.sum() * 0.0
    if max_positions and num > max_positions:
        idx = torch.randperm(num, generator=generator, device="cpu")[:max_positions]
        features = features[:, idx.to(features.device)]
        num = max_positions
    z = F.normalize(features.float(), dim=-1).reshape(n * num, -1)
    sim = (z @ z.T) / temperature                               # [nN, nN]
    pos_id = torch.arange(num, device=z.device).repeat(n)       # position of each row
    same_pos = pos_id[:, None] == pos_id[None, :]
    eye = torch.eye(n * num, dtype=torch.bool, device=z.device)
    positive = same_pos & ~eye
    # log-sum-exp over the negatives of each query, then combine with each positive
    neg_lse = sim.masked_fill(same_pos, float("-inf")).logsumexp(dim=1, keepdim=True)
    pair = torch.logaddexp(sim, neg_lse) - sim                  # -log softmax of the pair
    return pair[positive].mean()
