"""Static draft-vocabulary head: the baseline CORAL's router must beat.

EAGLE-3 and FR-Spec draft from a fixed shortlist, the most frequent tokens (e.g. 32k of
a 128k vocabulary; vLLM's `d2t` table). In the grouped layout of a frequency partition
those tokens are the first rows of `grouped_weight`, so the static head is one dense
GEMM over the contiguous slice `grouped_weight[:rows]`: the cost such a drafter pays,
with no router and no gathers. Rows past `rows` get no logit (the same -inf
restriction a routed drafter applies outside its groups), which keeps serving lossless.

Fixed shapes, no host synchronisation: safe inside a captured CUDA graph. `rows` must
not reach the padding rows of a ragged last group (`CoralConfig.active_rows` does not).
"""

from __future__ import annotations

import torch


def _slice_scores(hidden: torch.Tensor, grouped_weight: torch.Tensor,
                  rows: int) -> torch.Tensor:
    """[n, rows] scores in the weight's dtype (cuBLAS accumulates in fp32 and rounds the
    output, as the dense head it stands in for does)."""
    return hidden.to(grouped_weight.dtype) @ grouped_weight[:rows].T


def static_top1(hidden: torch.Tensor, grouped_weight: torch.Tensor,
                row_tokens: torch.Tensor, rows: int,
                scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(max logit [n] float32, its token id [n] int64) over the first `rows` rows: the
    greedy draft path; its largest tensor is the [n, rows] scores, never [n, V]."""
    values, col = _slice_scores(hidden, grouped_weight, rows).max(dim=-1)
    return values.float() * scale, row_tokens[col]


def static_logits(hidden: torch.Tensor, grouped_weight: torch.Tensor,
                  row_tokens: torch.Tensor, rows: int, vocab_size: int,
                  scale: float = 1.0) -> torch.Tensor:
    """Full-vocabulary logits [n, V] float32: the first `rows` rows' scores at their
    token ids, -inf elsewhere (probabilistic drafting samples from exactly this)."""
    logits = _slice_scores(hidden, grouped_weight, rows).float() * scale
    full = logits.new_full((logits.shape[0], vocab_size), float("-inf"))
    # the first `rows` rows hold distinct real tokens (no padding), one index for all
    full[:, row_tokens[:rows]] = logits
    return full
