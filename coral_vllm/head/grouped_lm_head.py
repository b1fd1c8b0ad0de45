"""Grouped LM head: logits of the router's activated vocabulary groups only.

Layout: `grouped_weight` is the LM head with its rows reordered by the partition
(`format.partition.grouped_rows`), shape [num_groups * group_size, d]; `row_tokens` gives the
token id of each row (-1 for padding). For token i and its activated groups
`group_ids[i] = (g_0 .. g_{k-1})`, column j * G + c of the result is row g_j * G + c.

This module is the plain PyTorch path (CPU, and the reference the Triton kernel of the
same name, `coral_vllm.kernels.grouped_lm_head`, is tested against). On CUDA the same
functions dispatch to the kernel. Every function on the draft path has fixed output
shapes and no host synchronisation, so it can sit inside a captured CUDA graph;
`grouped_layout_problem` is the one-time load check and does synchronise.
"""

from __future__ import annotations

import torch


def head_backend(t: torch.Tensor) -> str:
    """Which implementation serves tensors like `t`: the Triton kernel on CUDA, torch
    elsewhere."""
    return "triton" if t.is_cuda else "torch"


def column_tokens(row_tokens: torch.Tensor, group_ids: torch.Tensor,
                  group_size: int) -> torch.Tensor:
    """Token id of every active column, [n, k * G] int64 (-1 on padding rows)."""
    n, k = group_ids.shape
    rows = group_ids.unsqueeze(-1) * group_size + torch.arange(
        group_size, device=group_ids.device)
    return row_tokens[rows.reshape(n, k * group_size)]


def grouped_logits_torch(hidden: torch.Tensor, grouped_weight: torch.Tensor,
                         row_tokens: torch.Tensor, group_ids: torch.Tensor,
                         group_size: int, scale: float = 1.0
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: (logits [n, k*G] float32, token ids [n, k*G]); padding columns -inf.

    Two strategies, chosen from static shapes (no data-dependent branching):
    gather the k*G rows each token needs when that reads less than the whole head
    (n * k < num_groups), else score every row once and pick the columns, which is what
    a batch whose groups cover the vocabulary costs anyway.
    """
    n, k = group_ids.shape
    num_rows, d = grouped_weight.shape
    num_groups = num_rows // group_size
    if n * k < num_groups:
        w = grouped_weight.view(num_groups, group_size, d)[group_ids]  # [n, k, G, d]
        logits = torch.einsum("nd,nkgd->nkg", hidden.to(w.dtype), w).float()
        logits = logits.reshape(n, k * group_size)
    else:
        every = (hidden.to(grouped_weight.dtype) @ grouped_weight.T).float()
        every = every.view(n, num_groups, group_size)
        idx = group_ids.unsqueeze(-1).expand(n, k, group_size)
        logits = every.gather(1, idx).reshape(n, k * group_size)
    if scale != 1.0:
        logits = logits * scale
    tokens = column_tokens(row_tokens, group_ids, group_size)
    logits = logits.masked_fill(tokens < 0, float("-inf"))
    return logits, tokens


def grouped_logits(hidden: torch.Tensor, grouped_weight: torch.Tensor,
                   row_tokens: torch.Tensor, group_ids: torch.Tensor, group_size: int,
                   scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the active rows and their token ids; Triton on CUDA, torch elsewhere."""
    if head_backend(hidden) == "triton":
        from coral_vllm.kernels.grouped_lm_head import grouped_logits_triton
        return grouped_logits_triton(hidden, grouped_weight, row_tokens, group_ids,
                                     group_size, scale)
    return grouped_logits_torch(hidden, grouped_weight, row_tokens, group_ids,
                                group_size, scale)


def grouped_top1(hidden: torch.Tensor, grouped_weight: torch.Tensor,
                 row_tokens: torch.Tensor, group_ids: torch.Tensor, group_size: int,
                 scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(max logit [n] float32, its token id [n] int64) over the active groups.

    The draft step's greedy path: on CUDA the kernel fuses the max into the head so no
    [n, V] (or even [n, k*G]) tensor is written.
    """
    if head_backend(hidden) == "triton":
        from coral_vllm.kernels.grouped_lm_head import grouped_top1_triton
        return grouped_top1_triton(hidden, grouped_weight, row_tokens, group_ids,
                                   group_size, scale)
    logits, tokens = grouped_logits_torch(hidden, grouped_weight, row_tokens, group_ids,
                                          group_size, scale)
    values, col = logits.max(dim=-1)
    return values, tokens.gather(1, col.unsqueeze(1)).squeeze(1)


def scatter_to_vocab(logits: torch.Tensor, tokens: torch.Tensor,
                     vocab_size: int) -> torch.Tensor:
    """Full-vocabulary logits [n, V]: the active columns, -inf everywhere else.

    Needed only where vLLM wants a distribution over the whole vocabulary (probabilistic
    drafting, whose rejection test must see exactly this restricted distribution).
    Padding columns (token -1) go to a spare last column that is cut off.
    """
    n = logits.shape[0]
    full = logits.new_full((n, vocab_size + 1), float("-inf"))
    index = torch.where(tokens < 0, vocab_size, tokens)
    full.scatter_(1, index, logits)
    return full[:, :vocab_size]


def grouped_layout_problem(grouped_weight: torch.Tensor, head_weight: torch.Tensor,
                           token_order: torch.Tensor, chunk_rows: int = 4096) -> str | None:
    """What is wrong with `grouped_weight` as the grouped copy of `head_weight`, or None.

    It must hold the head's rows in partition order (row r = head row token_order[r];
    an entry -1 marks a padding row, which must be zero: the sharded head's layout),
    and the head must not be all zeros (a head nobody filled). Compared chunk by chunk
    so the check never holds a second copy of the head.
    """
    vocab = token_order.numel()
    head = head_weight[:vocab]
    if not bool(head.any()):
        return "the LM head it was copied from is all zeros"
    order = token_order.to(head.device)
    for start in range(0, vocab, chunk_rows):
        rows = order[start:start + chunk_rows]
        expected = head.index_select(0, rows.clamp(min=0)).masked_fill(
            (rows < 0).unsqueeze(1), 0)
        if not torch.equal(grouped_weight[start:start + rows.numel()],
                           expected.to(grouped_weight.dtype)):
            return (f"rows {start}..{start + rows.numel() - 1} differ from the LM head's "
                    "rows in partition order")
    return None
