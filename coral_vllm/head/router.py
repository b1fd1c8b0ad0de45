"""The CORAL router: which vocabulary groups the head computes for a drafted token.

p = softmax(W2(act(W1 h) + h)) over the groups, h being the drafter's output feature
(the same vector the LM head scores). Only the top-k group ids are needed, and top-k of
the logits equals top-k of p, so the softmax is never materialised on the hot path.
Plain torch: the training model and the vLLM drafter share this module and its
parameter names (`router.w1.*`, `router.w2.*`).

Pinned groups (`coral.pinned_groups` p, `format.config.PINNED_GROUPS`): the first p
groups of the frequency partition (the most frequent tokens) are always active and the
router's top k - p are taken among the other groups. `top_groups` is that rule, the one
definition every serving path (per token, batch-shared, sharded) and every offline
evaluator (validation tau, router recall) uses; p = 0 is the plain top k.
"""

from __future__ import annotations

import torch
from torch import nn

_ACTIVATIONS = {"silu": nn.functional.silu, "gelu": nn.functional.gelu,
                "relu": nn.functional.relu}


class Router(nn.Module):
    def __init__(self, hidden_size: int, num_groups: int, act: str = "silu",
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.w1 = nn.Linear(hidden_size, hidden_size, bias=True, dtype=dtype)
        self.w2 = nn.Linear(hidden_size, num_groups, bias=True, dtype=dtype)
        self.act = _ACTIVATIONS[act]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Group logits [n, num_groups] (softmax of these is the router's p)."""
        return self.w2(self.act(self.w1(h)) + h)

    def select(self, h: torch.Tensor, k: int, pinned: int = 0) -> torch.Tensor:
        """The active group ids per token, [n, k] int64 (`top_groups`; fixed shape, no
        sync)."""
        return top_groups(self.forward(h), k, pinned)


def top_groups(scores: torch.Tensor, k: int, pinned: int = 0) -> torch.Tensor:
    """Active group ids [..., k] from group scores [..., N] (router logits, or the
    batch-shared scores): groups 0..pinned-1, then the `k - pinned` best-scored of the
    groups pinned..N-1, so no group twice. Shapes depend only on (k, pinned), config
    values, and nothing reads the scores back: safe in a captured CUDA graph."""
    if not pinned:
        return torch.topk(scores, k, dim=-1, sorted=False).indices
    rest = torch.topk(scores[..., pinned:], k - pinned, dim=-1, sorted=False).indices
    fixed = torch.arange(pinned, device=scores.device).expand(*rest.shape[:-1], pinned)
    return torch.cat([fixed, rest + pinned], dim=-1)


def select_groups(router: Router | None, h: torch.Tensor, k: int,
                  pinned: int = 0) -> torch.Tensor:
    """Active group ids [n, k]: the router's picks (`top_groups`, with `pinned` groups
    always in), or, for a static drafter (no router), the first k groups, the most
    frequent tokens under the frequency partition. The offline evaluators score these
    through the grouped head, and so does serving with TP > 1 (the sharded head); at
    TP = 1 serving scores the static ones as one contiguous slice (`static_lm_head`), the
    same set of rows."""
    if router is None:
        return torch.arange(k, device=h.device).expand(h.shape[0], k)
    return router.select(h.to(router.w1.weight.dtype), k, pinned)
