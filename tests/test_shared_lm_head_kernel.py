"""Batch-shared groups: the Triton kernel vs a float64 reference (CPU: TRITON_INTERPRET=1).

The reference is the dense head restricted to the shared groups' rows, the same for
every token (`test_grouped_lm_head_kernel.reference` with one group list repeated).
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

try:
    import triton  # noqa: F401
except Exception as exc:  # pragma: no cover - depends on the environment
    pytest.skip(f"triton not importable: {exc}", allow_module_level=True)

import coral_vllm.kernels.shared_lm_head as slh  # noqa: E402
from coral_vllm.format.partition import grouped_rows  # noqa: E402
from coral_vllm.head.shared_lm_head import shared_logits_torch  # noqa: E402
from test_grouped_lm_head_kernel import (DEVICE, TOL, assert_logits, make_case,  # noqa: E402
                                         reference)


def shared_reference(head, hidden, groups, rows, group_size, scale=1.0):
    """(logits [n, U*G], tokens [U*G]) in float64."""
    logits, tokens = reference(head, hidden, groups.expand(hidden.shape[0], -1), rows,
                               group_size, scale)
    return logits, tokens[0]


def assert_top1(val, tok, ref, ref_tok, dtype):
    """The max matches, and the token is one whose reference logit is the max (ties:
    any of them)."""
    val, tok = val.cpu().double(), tok.cpu()
    ref_max = ref.max(dim=1).values
    mag = ref_max.abs().clamp(min=1.0)
    assert (val - ref_max).abs().le(TOL[dtype] * mag).all(), (val, ref_max)
    for i in range(ref.shape[0]):
        hits = (ref_tok == tok[i]).nonzero().flatten()
        assert tok[i] >= 0 and hits.numel() > 0, f"token {int(tok[i])} not a shared column"
        assert (ref_max[i] - ref[i, hits].max()).abs() <= TOL[dtype] * mag[i]


# (vocab, G, d, n, U): ragged last group (5 padding rows) in the list, n = 1 (the per-token
# path), n > 64 (two token tiles), more groups than tokens and the reverse, one group of
# at most one row block (one partial per token: no reduce)
SHAPES = [(55, 12, 40, 3, 2), (130, 11, 48, 1, 3), (190, 33, 96, 70, 4), (128, 16, 64, 5, 8),
          (45, 10, 32, 4, 1)]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "V{}_G{}_d{}_n{}_U{}".format(*s))
def test_logits_and_top1(shape, dtype):
    vocab, G, d, n, U = shape
    seed = zlib.crc32(repr((shape, str(dtype))).encode()) % 10_000
    head, _, weight, rows, hidden, _ = make_case(vocab, G, d, n, 1, dtype, seed)
    num_groups = math.ceil(vocab / G)
    groups = torch.randperm(num_groups, generator=torch.Generator().manual_seed(seed))[:U]
    groups[0] = num_groups - 1                       # the ragged last group
    ref, ref_tok = shared_reference(head, hidden, groups, rows, G, 0.75)
    h, w, rt, gi = (t.to(DEVICE) for t in (hidden, weight, rows, groups))
    # small row blocks and token tiles on fp32: several partials per token, two tiles
    configs = [None, {"BLOCK_R": 16, "BLOCK_N": 16}] if dtype == torch.float32 else [None]
    for config in configs:
        logits, tokens = slh.shared_logits_triton(h, w, rt, gi, G, 0.75, config=config)
        assert tokens.shape == (U * G,) and torch.equal(tokens.cpu(), ref_tok)
        assert_logits(logits.cpu(), ref, dtype)
        val, tok = slh.shared_top1_triton(h, w, rt, gi, G, 0.75, config=config)
        assert_top1(val, tok, ref, ref_tok, dtype)


def test_padding_never_wins_and_ties():
    """All real logits negative: a padding row (zero weights, score 0) never wins; two
    tokens with identical rows tie, and either may be drafted."""
    vocab, G, d, n = 55, 12, 40, 4                   # 5 groups, 5 padding rows in the last
    head, order, _, rows, hidden, _ = make_case(vocab, G, d, n, 1, torch.float32, 11)
    head = torch.where((head @ hidden[0] > 0)[:, None], -head, head)
    best = head[(head @ hidden[0]).argmax()]
    head[order[48]], head[order[49]] = best, best    # the maximum, tied, in the last group
    hidden[1] = hidden[0]
    weight = grouped_rows(head, order, math.ceil(vocab / G), G)
    groups = torch.tensor([4, 1])
    ref, ref_tok = shared_reference(head, hidden, groups, rows, G)
    assert float(ref[0].max()) < 0
    val, tok = slh.shared_top1_triton(hidden.to(DEVICE), weight.to(DEVICE), rows.to(DEVICE),
                                      groups.to(DEVICE), G, config={"BLOCK_R": 16})
    assert_top1(val, tok, ref, ref_tok, torch.float32)
    assert tok[0] == tok[1]


@pytest.mark.parametrize("n,U", [(3, 2), (1, 4)])
def test_torch_reference_matches_dense(n, U):
    """shared_logits_torch (the CPU path and the kernel's reference) == dense head."""
    head, _, weight, rows, hidden, _ = make_case(150, 16, 32, n, 1, torch.float32, 7)
    groups = torch.tensor([9, 0, 3, 5][:U])          # 9: the ragged last group
    ref, ref_tok = shared_reference(head, hidden, groups, rows, 16, 0.5)
    got, tok = shared_logits_torch(hidden, weight, rows, groups, 16, 0.5)
    assert torch.equal(tok, ref_tok)
    assert_logits(got, ref, torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_capture():
    head, _, weight, rows, hidden, _ = make_case(1000, 64, 128, 8, 1, torch.bfloat16, 3)
    h, w, rt = (t.cuda() for t in (hidden.to(torch.bfloat16), weight, rows))
    gi = torch.tensor([0, 5, 15, 7], device="cuda")
    slh.shared_top1_triton(h, w, rt, gi, 64)                     # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_v, _ = slh.shared_top1_triton(h, w, rt, gi, 64)
    gi.copy_(torch.tensor([1, 2, 3, 4], device="cuda"))
    h.copy_(torch.randn_like(h))
    graph.replay()
    torch.cuda.synchronize()
    ref, _ = shared_reference(head, h.float().cpu(), gi.cpu(), rows, 64)
    torch.testing.assert_close(out_v.cpu().double(), ref.max(1).values, rtol=1e-2, atol=1e-2)
