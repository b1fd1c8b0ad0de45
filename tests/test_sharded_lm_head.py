"""The grouped head on a vocabulary-sharded LM head equals the single-rank head.

Shards are simulated in one process (every rank's part computed here, the all-gather a
concatenation in rank order), plus one real 2-process run over torch.distributed gloo.
"""

from __future__ import annotations

import pytest
import torch

from coral_vllm.format.config import CoralConfig, CoralConfigError
from coral_vllm.head.grouped_lm_head import grouped_logits_torch, grouped_top1, scatter_to_vocab
from coral_vllm.format.partition import build_token_order, grouped_rows, row_token_ids
from coral_vllm.head.sharded_lm_head import (ShardedGroupedHead, check_shardable,
                                            shard_layout, vocab_shard)


def _head(vocab: int, d: int, groups: int, k: int, strategy: str, seed: int,
          integer: bool = False):
    """Config, dense head [padded to 64, d] and partition; integer-valued weights make
    every dot product exact, so ties stay ties however the sum is ordered."""
    g = torch.Generator().manual_seed(seed)
    cfg = CoralConfig.for_vocab(vocab, d, groups, k)
    padded = -(-vocab // 64) * 64
    weight = torch.zeros(padded, d, dtype=torch.float64)
    weight[:vocab] = (torch.randint(-3, 4, (vocab, d), generator=g).double() if integer
                      else torch.randn(vocab, d, generator=g, dtype=torch.float64))
    counts = torch.rand(vocab, generator=g)
    counts[: vocab // 3] += 1  # low ids frequent, as in BPE vocabularies: skewed groups
    order = build_token_order(strategy, vocab, groups, lm_head=weight[:vocab],
                              token_counts=counts)
    return cfg, weight, order


def _ranks(cfg: CoralConfig, weight: torch.Tensor, order: torch.Tensor, tp: int):
    """Every rank's head, filled from its shard of `weight` as vLLM would hand it."""
    heads = []
    for rank in range(tp):
        layout = shard_layout(order, cfg, tp, rank)
        shard = layout.shard
        head = ShardedGroupedHead(layout, cfg, tp, gather=None, dtype=weight.dtype,
                                  device="cpu")
        head.fill(weight[rank * shard.rows:(rank + 1) * shard.rows])
        assert head.layout_problem(weight[rank * shard.rows:(rank + 1) * shard.rows]) is None
        heads.append(head)
    return heads


def _sharded_top1(heads, h, group_ids):
    gathered = torch.cat([hd.local_top1(h, group_ids) for hd in heads], dim=-1)
    from coral_vllm.head.sharded_lm_head import reduce_top1
    return reduce_top1(gathered, len(heads))


def _sharded_logits(heads, h, group_ids, vocab):
    from coral_vllm.head.sharded_lm_head import gathered_to_vocab
    gathered = torch.cat([hd.local_logits(h, group_ids) for hd in heads], dim=-1)
    return gathered_to_vocab(gathered, len(heads), vocab)


def _single(cfg, weight, order, h, group_ids):
    gw = grouped_rows(weight[: cfg.vocab_size], order, cfg.num_groups, cfg.group_size)
    rows = row_token_ids(order, cfg.num_groups, cfg.group_size)
    _, top = grouped_top1(h, gw, rows, group_ids, cfg.group_size)
    logits, tokens = grouped_logits_torch(h, gw, rows, group_ids, cfg.group_size)
    return top, scatter_to_vocab(logits, tokens, cfg.vocab_size)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("strategy", ["contiguous", "frequency", "cluster"])
@pytest.mark.parametrize("vocab,groups,k,n", [(1000, 7, 2, 1), (1000, 7, 2, 9),
                                              (4096, 32, 4, 3), (257, 16, 16, 2),
                                              (10, 2, 1, 3)])  # ranks past the vocabulary
def test_sharded_equals_single_rank(tp, strategy, vocab, groups, k, n):
    cfg, weight, order = _head(vocab, 24, groups, k, strategy, seed=vocab + n + tp)
    h = torch.randn(n, 24, dtype=torch.float64)
    group_ids = torch.stack([torch.randperm(groups)[:k] for _ in range(n)])
    heads = _ranks(cfg, weight, order, tp)
    top, full = _single(cfg, weight, order, h, group_ids)
    assert torch.equal(_sharded_top1(heads, h, group_ids), top)
    sharded = _sharded_logits(heads, h, group_ids, vocab)
    assert torch.equal(torch.isfinite(sharded), torch.isfinite(full))
    torch.testing.assert_close(sharded, full, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("shared", [False, True])
def test_pinned_groups_equal_the_single_rank_head(tp, shared):
    """`pinned_groups`: the frequency partition's first groups (the hottest, wholly in
    shard 0) beside the router's picks, per token or batch-shared, draft as at TP = 1."""
    from coral_vllm.head.router import top_groups
    from coral_vllm.head.shared_lm_head import shared_groups

    cfg, weight, order = _head(4096, 24, 32, 8, "frequency", seed=tp)
    h = torch.randn(6, 24, dtype=torch.float64)
    logits = torch.randn(6, 32, dtype=torch.float64)
    group_ids = (shared_groups(logits, 8, 4).expand(6, -1) if shared
                 else top_groups(logits, 8, 4))
    heads = _ranks(cfg, weight, order, tp)
    top, full = _single(cfg, weight, order, h, group_ids)
    assert torch.equal(_sharded_top1(heads, h, group_ids), top)
    torch.testing.assert_close(_sharded_logits(heads, h, group_ids, 4096), full,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tp", [2, 4])
def test_batch_shared_groups_equal_the_single_rank_shared_head(tp):
    """`group_sharing: "batch"` with TP > 1 hands the shared set to the sharded head as
    every token's groups: the same drafts and distribution as the TP = 1 shared head."""
    from coral_vllm.head.shared_lm_head import shared_groups, shared_logits_torch, shared_top1

    cfg, weight, order = _head(1000, 24, 7, 3, "frequency", seed=tp)
    h = torch.randn(9, 24, dtype=torch.float64)
    groups = shared_groups(torch.randn(9, 7, dtype=torch.float64), 3)
    gw = grouped_rows(weight[:1000], order, 7, cfg.group_size)
    rows = row_token_ids(order, 7, cfg.group_size)
    heads = _ranks(cfg, weight, order, tp)
    every = groups.expand(9, -1)
    assert torch.equal(_sharded_top1(heads, h, every),
                       shared_top1(h, gw, rows, groups, cfg.group_size)[1])
    logits, tokens = shared_logits_torch(h, gw, rows, groups, cfg.group_size)
    torch.testing.assert_close(_sharded_logits(heads, h, every, 1000),
                               scatter_to_vocab(logits, tokens.expand(9, -1), 1000),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("strategy", ["frequency", "cluster"])
def test_ties_break_as_the_single_rank_head(tp, strategy):
    """Many exact ties (duplicated rows across shards, integer arithmetic): the sharded
    head drafts the TP=1 head's token, which is the first maximal active column."""
    cfg, weight, order = _head(512, 8, 16, 4, strategy, seed=tp, integer=True)
    weight[256:512] = weight[0:256]          # every token in shard >= 1 ties one below
    weight[100:200:2] = weight[101:201:2]    # and ties inside shard 0
    g = torch.Generator().manual_seed(tp)  # not the global RNG: earlier tests move it
    h = torch.randint(-2, 3, (64, 8), generator=g).double()
    group_ids = torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(64)])
    top, full = _single(cfg, weight, order, h, group_ids)
    n_ties = int(((full == full.max(-1, keepdim=True).values).sum(-1) > 1).sum())
    assert n_ties > 10, "the test should exercise ties"
    assert torch.equal(_sharded_top1(_ranks(cfg, weight, order, tp), h, group_ids), top)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton head needs CUDA")
@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("n", [1, 24, 256])   # the kernel's per-token, union, dense paths
def test_sharded_triton_head_equals_single_rank(tp, n):
    """On CUDA every rank's local head is the Triton kernel (random data: no exact ties,
    whose order the kernel leaves open)."""
    cfg, weight, order = _head(8192, 64, 64, 8, "frequency", seed=n + tp)
    weight = weight.float().cuda()
    h = torch.randn(n, 64, device="cuda")
    group_ids = torch.stack([torch.randperm(64)[:8] for _ in range(n)]).cuda()
    heads = [hd.cuda() for hd in _ranks(cfg, weight.cpu(), order, tp)]
    gw = grouped_rows(weight[: cfg.vocab_size], order, cfg.num_groups, cfg.group_size)
    rows = row_token_ids(order, cfg.num_groups, cfg.group_size).cuda()
    _, top = grouped_top1(h, gw, rows, group_ids, cfg.group_size)
    assert torch.equal(_sharded_top1(heads, h, group_ids), top)


def test_layout_holds_each_rank_only_its_rows():
    """Rank r's rows are exactly its shard's tokens (each once); a group spread evenly
    over the shards takes one sub-group slot, a skewed partition more."""
    cfg, weight, order = _head(4096, 24, 32, 4, "frequency", seed=1)
    for rank in range(4):
        layout = shard_layout(order, cfg, 4, rank)
        shard = vocab_shard(cfg.vocab_size, 4, rank)
        real = layout.row_tokens[layout.row_tokens >= 0]
        assert torch.equal(real.sort().values, torch.arange(shard.start, shard.end))
        assert layout.row_src.numel() < shard.rows + (cfg.num_groups + 1) * layout.sub_size
    assert shard_layout(order, cfg, 4, 0).slots_per_group > 1
    contiguous = shard_layout(torch.arange(4096).view(4, 32, 32).transpose(0, 1).reshape(-1),
                              cfg, 4, 0)  # every group 32 tokens from each shard
    assert contiguous.slots_per_group == 1


def test_vocab_shard_matches_vllm():
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    for vocab, tp in [(49152, 2), (1000, 4), (50257, 2), (262144, 4), (10, 4)]:
        for rank in range(tp):
            idx = VocabParallelEmbedding._get_indices(
                -(-vocab // 64) * 64, -(-vocab // 64) * 64, vocab, vocab, rank, tp)
            shard = vocab_shard(vocab, tp, rank)
            assert (shard.start, shard.end) == (idx.org_vocab_start_index,
                                                idx.org_vocab_end_index)
            assert shard.rows == idx.num_elements_padded


def test_unshardable_tp_is_named():
    cfg = CoralConfig.for_vocab(1000, 24, 7, 2)   # padded to 1024 rows
    check_shardable(cfg, 4)
    with pytest.raises(CoralConfigError, match=r"tensor_parallel_size 3: .* 1024 rows"):
        check_shardable(cfg, 3)
    with pytest.raises(CoralConfigError, match="positive integer"):
        check_shardable(cfg, 0)


def _gloo_rank(rank: int, port: int, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        torch.manual_seed(0)  # same data on both ranks, as vLLM's replicated hidden states
        cfg, weight, order = _head(1000, 24, 7, 2, "cluster", seed=5)
        h = torch.randn(5, 24, dtype=torch.float64)
        group_ids = torch.stack([torch.randperm(7)[:2] for _ in range(5)])

        def gather(x: torch.Tensor) -> torch.Tensor:
            parts = [torch.empty_like(x) for _ in range(2)]
            dist.all_gather(parts, x.contiguous())
            return torch.cat(parts, dim=-1)

        layout = shard_layout(order, cfg, 2, rank)
        head = ShardedGroupedHead(layout, cfg, 2, gather, torch.float64, "cpu")
        head.fill(weight[rank * layout.shard.rows:(rank + 1) * layout.shard.rows])
        top, full = _single(cfg, weight, order, h, group_ids)
        queue.put((rank, torch.equal(head.top_tokens(h, group_ids), top),
                   torch.allclose(head.logits(h, group_ids), full, rtol=0, atol=1e-12)))
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_run_equals_single_rank():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_gloo_rank, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert results == [(0, True, True), (1, True, True)]


def test_plugin_accepts_the_target_tp_and_names_what_it_cannot_run():
    """At the target's TP the coral config translates; a different draft TP, and a TP
    the vocabulary does not split into, fail naming the setting and the fix."""
    from coral_vllm.model_store.drafters import default_drafter
    from coral_vllm.serving.plugin import translate_coral_config

    spec = {"method": "coral", "model": str(default_drafter())}
    assert translate_coral_config(spec, tensor_parallel_size=2)["method"] == "eagle"
    assert translate_coral_config({**spec, "draft_tensor_parallel_size": 2},
                                  tensor_parallel_size=2)["method"] == "eagle"
    with pytest.raises(CoralConfigError, match=r'"draft_tensor_parallel_size" is 1 .* size 2'):
        translate_coral_config({**spec, "draft_tensor_parallel_size": 1},
                               tensor_parallel_size=2)
    with pytest.raises(CoralConfigError, match=r"tensor_parallel_size 5: .* 49152 rows"):
        translate_coral_config(spec, tensor_parallel_size=5)


def test_check_drafter_reports_the_sharding_or_one_error_line(capsys):
    from coral_vllm.cli import main
    from coral_vllm.model_store.drafters import default_drafter

    drafter = str(default_drafter())
    assert main(["check-drafter", drafter, "--tensor-parallel-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "tensor parallel 2: each rank re-groups its shard of 24576 rows" in out, out
    assert main(["check-drafter", drafter, "--tensor-parallel-size", "5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tensor_parallel_size 5" in err, err
