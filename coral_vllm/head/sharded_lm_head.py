"""The grouped head on a vocabulary-sharded LM head (tensor parallelism).

With tensor parallel size t, vLLM's `ParallelLMHead` (a `VocabParallelEmbedding`; read
from vLLM 0.26.0 and 0.32.0, identical there) pads the vocabulary to a multiple of 64 and
gives rank r the rows [r * P, (r + 1) * P), P = padded / t; the rows past the real
vocabulary (last shard only) are zero. A CORAL partition groups tokens without regard to
those shards (a frequency partition even puts the hottest groups wholly in shard 0), so
each rank re-groups its own rows at load, and the checkpoint stays as it is:

- the router is replicated, so every rank picks the same k global groups per token;
- rank r keeps, for every global group g, the tokens of g that live in its shard, in
  the partition's order, cut into sub-groups of `ceil(G / t)` rows (a group spread evenly
  over the shards is one sub-group per rank). Every group gets the same number S of
  sub-group slots (the most any group needs on any rank); unused slots point at a null
  sub-group of zero rows whose tokens are -1 (logit -inf);
- greedy: each rank scores only its local rows of the active groups (the unchanged
  grouped-head functions over the local layout, k * S slots) and contributes one
  (value, token, key) triple per token to an all-gather; the key is the column the TP=1
  head gives that token (slot j of the router's k, position in the group), and the
  reduction takes the largest value, then the smallest key. The TP=1 torch head returns
  the first maximal column, so TP=t drafts the TP=1 token, ties included;
- probabilistic: each rank contributes its active (logit, token) columns; after the
  gather they are scattered into one -inf [n, V] tensor, the TP=1 restricted distribution.

So the drafts of an existing checkpoint are the same at every t, and re-grouping at load
needs nothing at export. What t changes is the cost: a rank reads k * S * ceil(G / t)
rows per token (the null slots read one shared zero sub-group) and holds its shard plus
less than one sub-group of padding per group. S is 1 when every group spreads evenly
over the shards; a frequency partition that puts whole groups in one shard gives S = t,
i.e. k * G slot rows per token as at TP=1. Ids travel through the gather as float32,
exact below 2**24. Everything on the draft path has fixed shapes and no host
synchronisation, so it can be captured in a CUDA graph with vLLM's all-gather.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
from torch import nn

from coral_vllm.format.config import CoralConfig, CoralConfigError
from coral_vllm.head.grouped_lm_head import (grouped_layout_problem, grouped_logits,
                                            grouped_top1, scatter_to_vocab)

VOCAB_PADDING = 64           # vLLM's DEFAULT_VOCAB_PADDING_SIZE (0.26, 0.32)
FLOAT_EXACT_IDS = 1 << 24    # float32 holds every integer below this exactly
Gather = Callable[[torch.Tensor], torch.Tensor]  # all-gather along the last dim, rank order


@dataclasses.dataclass(frozen=True)
class VocabShard:
    """The rows rank `rank` of `tp` holds, as vLLM's VocabParallelEmbedding shards them."""

    start: int       # first token id (the shard's first row)
    end: int         # one past the last real token id (padding rows follow)
    rows: int        # P, rows of every shard including padding


def vocab_shard(vocab_size: int, tp: int, rank: int) -> VocabShard:
    padded = math.ceil(vocab_size / VOCAB_PADDING) * VOCAB_PADDING
    rows = padded // tp
    start = rank * rows
    # clamped like vLLM's org_vocab_start/end_index: a shard past the vocabulary is empty
    return VocabShard(min(start, vocab_size), min(start + rows, vocab_size), rows)


def check_shardable(coral: CoralConfig, tp: int) -> None:
    """Raises CoralConfigError, naming the setting and the fix, if the drafter's head
    cannot be split over `tp` ranks; any partition can, since ranks re-group at load."""
    if not isinstance(tp, int) or tp < 1:
        raise CoralConfigError(f"tensor_parallel_size must be a positive integer, got {tp!r}.")
    padded = math.ceil(coral.vocab_size / VOCAB_PADDING) * VOCAB_PADDING
    if padded % tp:
        raise CoralConfigError(
            f"tensor_parallel_size {tp}: vLLM pads the vocabulary of {coral.vocab_size} "
            f"tokens to {padded} rows and splits them into {tp} equal shards, which {tp} "
            f"does not divide; use a tensor_parallel_size that divides {padded}.")
    if tp > 1 and coral.padded_vocab >= FLOAT_EXACT_IDS:
        raise CoralConfigError(
            f'config.json "coral.num_groups" x "coral.group_size" = {coral.padded_vocab} '
            f"rows: the sharded head exchanges token ids as float32, exact only below "
            f"{FLOAT_EXACT_IDS}; serve this drafter with tensor_parallel_size 1.")


@dataclasses.dataclass
class ShardLayout:
    """Rank `rank`'s re-grouped rows (see the module docstring).

    row_src [R] shard row of each local grouped row (-1: zero padding row);
    row_tokens [R] its token id (-1 on padding); sub_of_group [N, S] the local sub-group
    behind slot s of global group g (the null sub-group if g has fewer);
    token_group / token_pos [P] the global group of each shard row and its position in
    that group (the TP=1 column within the group), -1 on padding rows.
    """

    shard: VocabShard
    sub_size: int
    row_src: torch.Tensor
    row_tokens: torch.Tensor
    sub_of_group: torch.Tensor
    token_group: torch.Tensor
    token_pos: torch.Tensor

    @property
    def slots_per_group(self) -> int:
        return self.sub_of_group.shape[1]


def shard_layout(token_order: torch.Tensor, coral: CoralConfig, tp: int,
                 rank: int) -> ShardLayout:
    """The local layout of `rank`; S is the maximum over all ranks, so every rank's
    gathered columns have the same width."""
    check_shardable(coral, tp)
    n_groups, size = coral.num_groups, coral.group_size
    order = token_order.long().cpu()
    shard = vocab_shard(coral.vocab_size, tp, rank)
    sub = math.ceil(size / tp)
    pos = torch.arange(order.numel())
    group = pos // size
    owner = order // shard.rows
    counts = torch.bincount(group * tp + owner, minlength=n_groups * tp).view(n_groups, tp)
    slots = int(((counts + sub - 1) // sub).max())
    mine = owner == rank                     # positions stay in partition order
    g, tok = group[mine], order[mine]
    count = counts[:, rank]
    index = torch.arange(g.numel()) - (torch.cumsum(count, 0) - count)[g]  # rank in group
    subs = (count + sub - 1) // sub
    base = torch.cumsum(subs, 0) - subs
    null = int(subs.sum())
    rows = (base[g] + index // sub) * sub + index % sub
    row_src = torch.full(((null + 1) * sub,), -1, dtype=torch.int64)
    row_src[rows] = tok - shard.start
    row_tokens = torch.where(row_src >= 0, row_src + shard.start, -1)
    s = torch.arange(slots)
    sub_of_group = torch.where(s < subs[:, None], base[:, None] + s, null)
    token_group = torch.full((shard.rows,), -1, dtype=torch.int64)
    token_pos = torch.full((shard.rows,), -1, dtype=torch.int64)
    token_group[tok - shard.start] = g
    token_pos[tok - shard.start] = pos[mine] - g * size
    return ShardLayout(shard, sub, row_src, row_tokens, sub_of_group, token_group, token_pos)


def describe_sharding(token_order: torch.Tensor, coral: CoralConfig, tp: int) -> str:
    """One line on what each of `tp` ranks holds and reads (`coral-vllm check-drafter`)."""
    layouts = [shard_layout(token_order, coral, tp, r) for r in range(tp)]
    first = layouts[0]
    held = max(layout.row_src.numel() for layout in layouts)
    per_token = coral.top_k_groups * first.slots_per_group * first.sub_size
    return (f"tensor parallel {tp}: each rank re-groups its shard of {first.shard.rows} rows "
            f"into {first.slots_per_group} slot(s) of {first.sub_size} rows per group, "
            f"holds at most {held} rows and scores at most {per_token} slot rows per token "
            f"(TP=1: {coral.top_k_groups * coral.group_size})")


def reduce_top1(gathered: torch.Tensor, tp: int) -> torch.Tensor:
    """Global draft token [n] int64 from the gathered (value, token, key) triples
    [n, 3 * tp]: the largest value, among equal values the smallest key (TP=1's first
    maximal column)."""
    value, token, key = gathered.view(-1, tp, 3).unbind(-1)
    best = value.max(dim=-1, keepdim=True).values
    winner = torch.where(value == best, key, float("inf")).argmin(dim=-1, keepdim=True)
    return token.gather(-1, winner).squeeze(-1).long()


def gathered_to_vocab(gathered: torch.Tensor, tp: int, vocab_size: int) -> torch.Tensor:
    """[n, V] logits (-inf off the active groups) from the gathered [n, tp * 2 * W]
    (every rank's W logits, then its W token ids as float)."""
    n = gathered.shape[0]
    parts = gathered.view(n, tp, 2, -1)
    logits = parts[:, :, 0].reshape(n, -1)
    tokens = parts[:, :, 1].reshape(n, -1).long()
    return scatter_to_vocab(logits, tokens, vocab_size)


class ShardedGroupedHead(nn.Module):
    """One rank's grouped head: its re-grouped shard rows and the tables to use them.

    `gather` all-gathers a [n, c] tensor along the last dim into [n, tp * c] in rank
    order (vLLM's `tensor_model_parallel_all_gather(x, dim=-1)` when serving, a
    simulated or torch.distributed one in tests). `local_top1` / `local_logits` are
    what a rank contributes; `top_tokens` / `logits` add the gather and the reduction.
    """

    def __init__(self, layout: ShardLayout, coral: CoralConfig, tp: int, gather: Gather,
                 dtype: torch.dtype, device: torch.device | str,
                 scale: float = 1.0) -> None:
        super().__init__()
        self.coral, self.tp, self.gather, self.scale = coral, tp, gather, scale
        self.shard, self.sub_size = layout.shard, layout.sub_size
        for name in ("row_src", "row_tokens", "sub_of_group", "token_group", "token_pos"):
            self.register_buffer(name, getattr(layout, name).to(device), persistent=False)
        self.register_buffer("weight", torch.zeros(layout.row_src.numel(), coral.hidden_size,
                                                   dtype=dtype, device=device),
                             persistent=False)

    @torch.no_grad()
    def fill(self, shard_weight: torch.Tensor) -> None:
        """Copies this rank's LM-head shard [P, d] into the grouped layout."""
        src = self.row_src.clamp(min=0)
        torch.index_select(shard_weight.to(self.weight.dtype), 0, src, out=self.weight)
        self.weight.masked_fill_((self.row_src < 0).unsqueeze(1), 0)

    def layout_problem(self, shard_weight: torch.Tensor) -> str | None:
        """What is wrong with `weight` as the grouped copy of `shard_weight`, or None
        (a shard past the end of the vocabulary is all padding: nothing to check)."""
        if self.shard.end == self.shard.start:
            return None
        return grouped_layout_problem(self.weight, shard_weight, self.row_src)

    def _local_groups(self, group_ids: torch.Tensor) -> torch.Tensor:
        """[n, k] global groups -> [n, k * S] local sub-groups, slot-major like TP=1."""
        return self.sub_of_group[group_ids].reshape(group_ids.shape[0], -1)

    def local_top1(self, hidden: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        """This rank's best active row per token as float32 (value, token, key) [n, 3];
        a token with no local active row gives (-inf, -1, inf)."""
        value, token = grouped_top1(hidden, self.weight, self.row_tokens,
                                    self._local_groups(group_ids), self.sub_size, self.scale)
        row = (token - self.shard.start).clamp(min=0)
        slot = (group_ids == self.token_group[row].unsqueeze(1)).long().argmax(dim=-1)
        key = (slot * self.coral.group_size + self.token_pos[row]).float()
        key = torch.where(token >= 0, key, float("inf"))
        return torch.stack([value.float(), token.float(), key], dim=-1)

    def local_logits(self, hidden: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        """This rank's active logits then their token ids (as float), [n, 2 * k*S*sub]."""
        logits, tokens = grouped_logits(hidden, self.weight, self.row_tokens,
                                        self._local_groups(group_ids), self.sub_size,
                                        self.scale)
        return torch.cat([logits, tokens.float()], dim=-1)

    def top_tokens(self, hidden: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        return reduce_top1(self.gather(self.local_top1(hidden, group_ids)), self.tp)

    def logits(self, hidden: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        return gathered_to_vocab(self.gather(self.local_logits(hidden, group_ids)), self.tp,
                                 self.coral.vocab_size)
