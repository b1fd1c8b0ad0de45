"""Vocabulary partitions: which tokens share a group of LM-head rows.

A partition is a permutation `token_order` of the vocabulary; group g holds the tokens
`token_order[g * G : (g + 1) * G]`. Grouping is then a matter of reordering the LM-head
rows once (`grouped_rows`), after which every group is a contiguous slab of memory that a
kernel streams without gathers. Three strategies, compared by router recall in training:

- contiguous: token ids in order (tokenizers put related merges near each other only
  loosely; this is the baseline);
- frequency: tokens ranked by how often the target emits them, so frequent tokens share a
  few "hot" groups the router can learn to pick cheaply;
- cluster: tokens ordered by a k-means clustering of their LM-head rows, so tokens the head
  scores alike (and which compete for top-1) sit in the same group.
"""

from __future__ import annotations

import torch

from coral_vllm.format.config import CoralConfigError


def validate_token_order(token_order: torch.Tensor, vocab_size: int) -> None:
    """Checks that `token_order` covers every token exactly once."""
    if token_order.dim() != 1 or token_order.numel() != vocab_size:
        raise CoralConfigError(
            f'tensor "partition.token_order" has shape {tuple(token_order.shape)}; it must be '
            f"[{vocab_size}] (one entry per vocabulary token). Re-export the drafter for "
            "this target.")
    if token_order.dtype.is_floating_point:
        raise CoralConfigError('tensor "partition.token_order" must hold integer token ids.')
    seen = torch.zeros(vocab_size, dtype=torch.int64)
    in_range = (token_order >= 0) & (token_order < vocab_size)
    if not bool(in_range.all()):
        bad = token_order[~in_range][:5].tolist()
        raise CoralConfigError(
            f'tensor "partition.token_order" holds ids outside [0, {vocab_size}): {bad}; '
            "the partition was built for another vocabulary.")
    seen.index_add_(0, token_order.long(), torch.ones_like(token_order, dtype=torch.int64))
    if not bool((seen == 1).all()):
        missing = (seen == 0).nonzero().flatten()[:5].tolist()
        twice = (seen > 1).nonzero().flatten()[:5].tolist()
        raise CoralConfigError(
            'tensor "partition.token_order" does not cover every token exactly once '
            f"(missing e.g. {missing}, repeated e.g. {twice}); rebuild the partition.")


def row_token_ids(token_order: torch.Tensor, num_groups: int, group_size: int) -> torch.Tensor:
    """Token id of each grouped-head row, `-1` for the padding rows of a ragged last group."""
    padded = torch.full((num_groups * group_size,), -1, dtype=torch.int64)
    padded[: token_order.numel()] = token_order.long()
    return padded


def grouped_rows(weight: torch.Tensor, token_order: torch.Tensor, num_groups: int,
                 group_size: int) -> torch.Tensor:
    """LM-head rows reordered so each group is contiguous; padding rows are zero."""
    out = weight.new_zeros((num_groups * group_size, weight.shape[1]))
    out[: token_order.numel()] = weight.index_select(0, token_order.to(weight.device).long())
    return out


def contiguous_order(vocab_size: int) -> torch.Tensor:
    return torch.arange(vocab_size, dtype=torch.int64)


def frequency_order(token_counts: torch.Tensor) -> torch.Tensor:
    """Tokens by descending count; ties keep id order so the result is deterministic."""
    counts = token_counts.to(torch.float64)
    ids = torch.arange(counts.numel(), dtype=torch.int64)
    # stable sort on -count keeps lower ids first among equal counts
    return ids[torch.sort(-counts, stable=True).indices]


def cluster_order(lm_head: torch.Tensor, num_groups: int, iters: int = 10,
                  seed: int = 0) -> torch.Tensor:
    """Tokens ordered by balanced spherical k-means over their LM-head rows.

    Groups must have equal size, so after k-means the tokens are sorted by (cluster,
    similarity to its centroid) and cut into equal chunks: clusters larger than a group
    spill into the next one rather than being truncated.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(lm_head.float(), dim=1)
    v = x.shape[0]
    centroids = x[torch.randperm(v, generator=g)[:num_groups]].clone()
    for _ in range(iters):
        assign = (x @ centroids.T).argmax(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=num_groups).unsqueeze(1)
        empty = counts.squeeze(1) == 0
        centroids = torch.where(empty.unsqueeze(1), centroids, sums / counts.clamp(min=1))
        centroids = torch.nn.functional.normalize(centroids, dim=1)
    sim = x @ centroids.T
    assign = sim.argmax(dim=1)
    closeness = sim.gather(1, assign.unsqueeze(1)).squeeze(1)
    # order by cluster id, then most central first; cluster ids ordered by size so that
    # big clusters start on a group boundary
    sizes = torch.bincount(assign, minlength=num_groups)
    rank_of_cluster = torch.empty_like(sizes)
    rank_of_cluster[torch.argsort(-sizes, stable=True)] = torch.arange(num_groups)
    key = rank_of_cluster[assign].double() * 4.0 - closeness.double()  # closeness in [-1, 1]
    return torch.argsort(key, stable=True)


def build_token_order(strategy: str, vocab_size: int, num_groups: int, *,
                      token_counts: torch.Tensor | None = None,
                      lm_head: torch.Tensor | None = None) -> torch.Tensor:
    """One entry point for every strategy; raises naming what a strategy needs."""
    if strategy == "contiguous":
        order = contiguous_order(vocab_size)
    elif strategy == "frequency":
        if token_counts is None:
            raise CoralConfigError("partition 'frequency' needs token counts from the data.")
        order = frequency_order(token_counts)
    elif strategy == "cluster":
        if lm_head is None:
            raise CoralConfigError("partition 'cluster' needs the LM-head weight.")
        order = cluster_order(lm_head[:vocab_size], num_groups)
    else:
        raise CoralConfigError(f"unknown partition strategy {strategy!r}; choose "
                               "contiguous, frequency or cluster.")
    validate_token_order(order, vocab_size)
    return order


def group_of_token(token_order: torch.Tensor, group_size: int) -> torch.Tensor:
    """Inverse map: group id of every token id (the router's training label)."""
    groups = torch.empty_like(token_order)
    groups[token_order.long()] = torch.arange(token_order.numel()) // group_size
    return groups
