"""The CORAL router: which vocabulary groups the head computes for a drafted token.

p = softmax(W2(act(W1 h) + h)) over the groups, h being the drafter's output feature
(the same vector the LM head scores). Only the top-k group ids are needed, and top-k of
the logits equals top-k of p, so the softmax is never materialised on the hot path.
Plain torch: the training model and the vLLM drafter share this module and its
parameter names (`router.w1.*`, `router.w2.*`).
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

    def select(self, h: torch.Tensor, k: int) -> torch.Tensor:
        """The k most probable group ids per token, [n, k] int64 (fixed shape, no sync)."""
        return torch.topk(self.forward(h), k, dim=-1, sorted=False).indices


def select_groups(router: Router | None, h: torch.Tensor, k: int) -> torch.Tensor:
    """Active group ids [n, k]: the router's top k, or, for a static drafter (no router),
    the first k groups, the most frequent tokens under the frequency partition. The
    offline evaluators score these through the grouped head, and so does serving with
    TP > 1 (the sharded head); at TP = 1 serving scores the static ones as one contiguous
    slice (`static_lm_head`), the same set of rows."""
    if router is None:
        return torch.arange(k, device=h.device).expand(h.shape[0], k)
    return router.select(h.to(router.w1.weight.dtype), k)
