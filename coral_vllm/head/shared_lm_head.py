"""Batch-shared groups: one set of active vocabulary groups for every token of a draft step.

Why: with per-token groups (`grouped_lm_head`) a draft step of n tokens reads the rows
of every group some token picked, up to n*k*G rows (nearly the whole head once n*k
approaches the number of groups), while the static draft vocabulary reads k*G. Here the
n tokens share one set of U = k groups, picked from all their router scores, so a step
reads U*G rows at any batch size, as many as the static head, and the Triton kernel of
the same name (`coral_vllm.kernels.shared_lm_head`) reads each of them once for all n.

Which groups (`shared_groups`): score_g = max_i p[i, g] + 1[g is some token's argmax
group], p the router's softmax. Probabilities are <= 1, so every token's best group
ranks ahead of the rest (all of them are in when n <= U), then the groups some token
likes most. At n = 1 the set is the token's own top k, the per-token candidate set.
With pinned groups (`coral.pinned_groups` p) the set is groups 0..p-1 plus the top k - p
of the same scores over the other groups (`router.top_groups`); a token whose best
group is pinned is covered already, and at n = 1 the set is again the token's own.
The trade-off: at n > 1 a token may lose its other groups to the batch, so acceptance
can drop with batch size; never correctness, because every token is scored over
exactly the shared rows and probabilistic drafting scatters exactly those logits into
a -inf [n, V] tensor (`scatter_to_vocab`), the distribution the rejection sampler sees.

This module is the plain PyTorch path (CPU, and the kernel's reference); on CUDA the
same functions dispatch to the kernel. Fixed shapes, no host synchronisation: safe
inside a captured CUDA graph.
"""

from __future__ import annotations

import torch

from coral_vllm.head.grouped_lm_head import column_tokens, head_backend
from coral_vllm.head.router import top_groups


def shared_groups(router_logits: torch.Tensor, k: int, pinned: int = 0) -> torch.Tensor:
    """The k group ids [k] int64 the whole batch shares, from router logits [n, N]; the
    first `pinned` groups always among them."""
    p = router_logits.float().softmax(dim=-1)
    best = p.new_zeros(p.shape[-1]).index_fill(0, p.argmax(dim=-1), 1.0)
    score = p.amax(dim=0) + best
    return top_groups(score, k, pinned)


def shared_logits_torch(hidden: torch.Tensor, grouped_weight: torch.Tensor,
                        row_tokens: torch.Tensor, groups: torch.Tensor, group_size: int,
                        scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: (logits [n, U*G] float32, token ids [U*G] int64, the same for every
    token); column j*G + c is row groups[j]*G + c; padding columns -inf / -1."""
    num_rows, d = grouped_weight.shape
    w = grouped_weight.view(num_rows // group_size, group_size, d)[groups]  # [U, G, d]
    logits = (hidden.to(w.dtype) @ w.reshape(-1, d).T).float()
    if scale != 1.0:
        logits = logits * scale
    tokens = column_tokens(row_tokens, groups.unsqueeze(0), group_size).squeeze(0)
    return logits.masked_fill(tokens < 0, float("-inf")), tokens


def shared_logits(hidden: torch.Tensor, grouped_weight: torch.Tensor,
                  row_tokens: torch.Tensor, groups: torch.Tensor, group_size: int,
                  scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the shared rows [n, U*G] and their token ids [U*G]; Triton on CUDA."""
    if head_backend(hidden) == "triton":
        from coral_vllm.kernels.shared_lm_head import shared_logits_triton
        return shared_logits_triton(hidden, grouped_weight, row_tokens, groups, group_size,
                                    scale)
    return shared_logits_torch(hidden, grouped_weight, row_tokens, groups, group_size,
                               scale)


def shared_top1(hidden: torch.Tensor, grouped_weight: torch.Tensor,
                row_tokens: torch.Tensor, groups: torch.Tensor, group_size: int,
                scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(max logit [n] float32, its token id [n] int64) over the shared groups: the greedy
    draft path (on CUDA fused into the kernel: no [n, V] or [n, U*G] tensor)."""
    if head_backend(hidden) == "triton":
        from coral_vllm.kernels.shared_lm_head import shared_top1_triton
        return shared_top1_triton(hidden, grouped_weight, row_tokens, groups, group_size,
                                  scale)
    logits, tokens = shared_logits_torch(hidden, grouped_weight, row_tokens, groups,
                                         group_size, scale)
    values, col = logits.max(dim=-1)
    return values, tokens[col]
