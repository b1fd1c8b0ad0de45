"""Losses: EAGLE/HASS per-step loss and CORAL's Cross-Step Representation Alignment.

All functions take the masked positions already flattened to [N, ...], so nothing
vocabulary-sized is computed for padding or prompt tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def target_distribution(target_feat: torch.Tensor, lm_head: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs [N, V] float32, top-1 [N]) of the target at f_{t+1}; shared by all steps."""
    with torch.no_grad():
        logits = (target_feat.float() @ lm_head.float().T)
        return logits.softmax(-1), logits.argmax(-1)


def step_loss(pred: torch.Tensor, target_feat: torch.Tensor, lm_head: torch.Tensor, *,
              feature_weight: float = 1.0, distill_weight: float = 0.1,
              target: tuple[torch.Tensor, torch.Tensor] | None = None
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """EAGLE loss at one step over N positions.

    SmoothL1(pred, f_{t+1}) * feature_weight + distill_weight * soft CE between the
    target's distribution softmax(lm_head(f_{t+1})) and the drafter's lm_head(pred).
    `target` = target_distribution(...) if already computed. Returns (loss, stats) with
    acc = top-1 agreement with the target.
    """
    t_probs, t_top1 = target if target is not None else target_distribution(target_feat, lm_head)
    feat = F.smooth_l1_loss(pred.float(), target_feat.float())
    d_logits = (pred.float() @ lm_head.float().T)
    ce = -(t_probs * d_logits.log_softmax(-1)).sum(-1).mean()
    loss = feature_weight * feat + distill_weight * ce
    with torch.no_grad():
        acc = (d_logits.argmax(-1) == t_top1).float().mean()
    return loss, {"feat": feat.item(), "ce": ce.item(), "acc": acc.item()}


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
