"""Grouped LM-head Triton kernels vs a float64 reference (CPU: TRITON_INTERPRET=1).

The reference is the dense head restricted to the activated groups: build an ordinary
head W [V, d], a random partition, the grouped weight from `partition.grouped_rows`, and
score (hidden rounded to the weight dtype) @ W.T in float64, then read off the columns
of the chosen groups. Outputs are poisoned first so an unwritten element fails.
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

import coral_vllm.kernels.grouped_lm_head as glh  # noqa: E402
from coral_vllm.head.grouped_lm_head import grouped_logits_torch  # noqa: E402
from coral_vllm.format.partition import grouped_rows, row_token_ids  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SENTINEL = -7777
TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def make_case(vocab, group_size, d, n, k, dtype, seed, choices="random"):
    """Random head, partition, hidden states and group choices (never zeros)."""
    g = torch.Generator().manual_seed(seed)
    num_groups = math.ceil(vocab / group_size)
    head = torch.randn(vocab, d, generator=g).to(dtype)
    order = torch.randperm(vocab, generator=g)
    weight = grouped_rows(head, order, num_groups, group_size)
    rows = row_token_ids(order, num_groups, group_size)
    hidden = torch.randn(n, d, generator=g)
    if choices == "random":
        gids = torch.randint(0, num_groups, (n, k), generator=g)
    elif choices == "identical":     # every token picks the same groups
        gids = torch.randint(0, num_groups, (1, k), generator=g).expand(n, k).clone()
    elif choices == "dups":          # duplicates across and within tokens, ragged group
        gids = torch.randint(0, num_groups, (n, k), generator=g)
        gids[0, :] = num_groups - 1
        if k > 1:
            gids[-1, 1] = gids[-1, 0]
        if n > 1:
            gids[1] = gids[0]
    else:
        raise ValueError(choices)
    return head, order, weight, rows, hidden, gids


def reference(head, hidden, gids, rows, group_size, scale=1.0):
    """float64 dense head restricted to the active columns: (logits, tokens)."""
    dense = (hidden.to(head.dtype).double() @ head.double().T) * scale     # [n, V]
    n, k = gids.shape
    cols = (gids.unsqueeze(-1) * group_size + torch.arange(group_size)).reshape(n, -1)
    tokens = rows[cols]
    logits = dense.gather(1, tokens.clamp(min=0))
    logits = logits.masked_fill(tokens < 0, float("-inf"))
    return logits, tokens


def assert_logits(got, ref, dtype):
    assert not torch.isnan(got).any(), "unwritten (NaN) logits"
    assert torch.equal(torch.isinf(got), torch.isinf(ref)), "padding columns differ"
    fin = torch.isfinite(ref)
    mag = ref[fin].abs().max().clamp(min=1.0)
    err = (got.double()[fin] - ref[fin]).abs().max() if fin.any() else torch.tensor(0.0)
    assert err <= TOL[dtype] * mag, f"max |err| {float(err):.3g} > {TOL[dtype]} * {float(mag):.3g}"


# (vocab, G, d, n, k, choices): exact and ragged last groups, n = 1, n > k*G, n > 64
# (two token tiles in the union path), identical / duplicate choices; "auto" picks
# per_token, union, dense, union for them.
SHAPES = [
    (128, 16, 64, 1, 3, "random"),
    (130, 11, 48, 5, 3, "dups"),
    (55, 12, 40, 66, 2, "dups"),
    (190, 33, 96, 8, 4, "identical"),
]
PATHS = ["per_token", "union", "dense", "auto"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# small blocks: several row blocks per group, several select blocks per token (one
# program looping over them, or one program each plus the reduce), ragged tails
CONFIGS = {"per_token": [{"BLOCK_R": 16}], "union": [{"BLOCK_R": 16, "BLOCK_N": 16}],
           "dense": [{"BLOCK": 16}, {"BLOCK": 16, "ONE_PASS": False}], "auto": []}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "V{}_G{}_d{}_n{}_k{}_{}".format(*s))
def test_logits_and_top1(shape, path, dtype):
    vocab, G, d, n, k, choices = shape
    seed = zlib.crc32(repr((shape, path, str(dtype))).encode()) % 10_000
    head, _, weight, rows, hidden, gids = make_case(vocab, G, d, n, k, dtype, seed, choices)
    scale = 0.75 if n == 5 else 1.0
    ref, ref_tok = reference(head, hidden, gids, rows, G, scale)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    h, w, rt, gi = dev(hidden), dev(weight), dev(rows), dev(gids)
    # hidden in the weight dtype too on two paths (the serving case)
    if dtype != torch.float32 and path in ("union", "dense"):
        h = h.to(dtype)

    # block-size overrides change only the tiling, not the dtype handling: fp32 only
    configs = [None] + CONFIGS[path] if dtype == torch.float32 else [None]
    for config in configs:
        out_l = torch.full((n, k * G), float("nan"), device=DEVICE)
        out_t = torch.full((n, k * G), SENTINEL, dtype=torch.int64, device=DEVICE)
        got_l, got_t = glh.grouped_logits_triton(h, w, rt, gi, G, scale, out_l, out_t,
                                                 path=path, config=config)
        assert got_l.data_ptr() == out_l.data_ptr() and got_t.data_ptr() == out_t.data_ptr()
        assert torch.equal(got_t.cpu(), ref_tok), "token ids differ"
        assert_logits(got_l.cpu(), ref, dtype)

        out_v = torch.full((n,), float("nan"), device=DEVICE)
        out_i = torch.full((n,), SENTINEL, dtype=torch.int64, device=DEVICE)
        val, tok = glh.grouped_top1_triton(h, w, rt, gi, G, scale, out_v, out_i,
                                           path=path, config=config)
        val, tok = val.cpu().double(), tok.cpu()
        ref_max = ref.max(dim=1).values
        mag = ref_max.abs().clamp(min=1.0)
        assert (val - ref_max).abs().le(TOL[dtype] * mag).all(), (val, ref_max)
        # the token must be one whose reference logit is the maximum (ties: any of them)
        for i in range(n):
            assert tok[i] >= 0
            hits = (ref_tok[i] == tok[i]).nonzero().flatten()
            assert hits.numel() > 0, f"token {int(tok[i])} not among the active columns"
            assert (ref_max[i] - ref[i, hits].max()).abs() <= TOL[dtype] * mag[i]

    # defaults: fresh outputs allocated by the wrappers (dtype-independent: fp32 only)
    if dtype != torch.float32:
        return
    got_l, got_t = glh.grouped_logits_triton(h, w, rt, gi, G, scale, path=path)
    assert got_l.shape == (n, k * G) and got_l.dtype == torch.float32
    assert got_t.dtype == torch.int64
    assert_logits(got_l.cpu(), ref, dtype)


@pytest.mark.parametrize("path", ["per_token", "union", "dense"])
def test_padding_never_wins_top1(path):
    """All real logits negative: a padding row (zero weights, score 0) must not win."""
    vocab, G, d, n, k = 55, 12, 40, 3, 2          # 5 groups, 5 padding rows in the last
    head, order, _, rows, hidden, gids = make_case(vocab, G, d, n, k, torch.float32, 11)
    head = torch.where((head @ hidden[0] > 0)[:, None], -head, head)
    weight = grouped_rows(head, order, math.ceil(vocab / G), G)
    gids[0] = torch.tensor([4, 1])
    ref, ref_tok = reference(head, hidden, gids, rows, G)
    val, tok = glh.grouped_top1_triton(hidden.to(DEVICE), weight.to(DEVICE), rows.to(DEVICE),
                                       gids.to(DEVICE), G, path=path)
    assert float(ref[0].max()) < 0
    torch.testing.assert_close(val.cpu().double(), ref.max(1).values, rtol=1e-4, atol=1e-4)
    assert torch.equal(tok.cpu(), ref_tok.gather(1, ref.argmax(1, keepdim=True)).squeeze(1))


@pytest.mark.parametrize("path", ["per_token", "union", "dense"])
def test_single_partial_per_token(path):
    """k = 1 and G <= BLOCK_R: the kernel's one partial per token is written straight to
    the outputs (no reduce launch), as the dense path's one-pass top-1 always does."""
    vocab, G, d, n, k = 45, 10, 32, 4, 1
    head, _, weight, rows, hidden, gids = make_case(vocab, G, d, n, k, torch.float32, 5)
    gids[0, 0] = math.ceil(vocab / G) - 1      # ragged last group
    ref, ref_tok = reference(head, hidden, gids, rows, G)
    out_v = torch.full((n,), float("nan"), device=DEVICE)
    out_i = torch.full((n,), SENTINEL, dtype=torch.int64, device=DEVICE)
    glh.grouped_top1_triton(hidden.to(DEVICE), weight.to(DEVICE), rows.to(DEVICE),
                            gids.to(DEVICE), G, 1.0, out_v, out_i, path=path,
                            config={"BLOCK_R": 16})
    torch.testing.assert_close(out_v.cpu().double(), ref.max(1).values, rtol=1e-4, atol=1e-4)
    assert torch.equal(out_i.cpu(), ref_tok.gather(1, ref.argmax(1, keepdim=True)).squeeze(1))


def test_path_rule():
    # (n, k, N, G, d): cells of the H200 run (benchmarks/results/lm_head.json) the rule
    # was fitted to; bf16 unless given
    assert glh.choose_path(1, 64, 256, 501, 4096) == "per_token"   # n*k = N/4
    assert glh.choose_path(4, 16, 256, 192, 576) == "per_token"
    assert glh.choose_path(4, 32, 256, 501, 4096) == "union"       # n*k = N/2
    assert glh.choose_path(16, 8, 256, 192, 576) == "union"
    assert glh.choose_path(16, 64, 256, 192, 576) == "union"       # small head, n < 64
    assert glh.choose_path(64, 8, 256, 192, 576) == "dense"        # 54 MiB head, c 0.87
    assert glh.choose_path(64, 64, 256, 192, 576) == "dense"
    assert glh.choose_path(64, 64, 256, 1024, 640) == "union"      # 320 MiB head
    assert glh.choose_path(64, 64, 256, 501, 4096) == "union"
    # the bounds: 128 MiB of head (in bytes, so fp32 halves the rows), coverage 0.8
    assert glh.choose_path(64, 64, 256, 512, 512) == "dense"       # 128 MiB
    assert glh.choose_path(64, 64, 256, 512, 512, 4) == "union"    # 256 MiB
    assert glh.choose_path(64, 7, 256, 192, 576) == "dense"        # c = 0.83
    assert glh.choose_path(64, 6, 256, 192, 576) == "union"        # c = 0.78


def test_auto_uses_every_path():
    """The SHAPES above reach all three paths through "auto" (so "auto" tests the rule)."""
    got = {glh.choose_path(n, k, math.ceil(v / g), g, d, 4) for v, g, d, n, k, _ in SHAPES}
    assert got == {"per_token", "union", "dense"}


def test_bad_path_rejected():
    head, _, weight, rows, hidden, gids = make_case(64, 16, 32, 2, 2, torch.float32, 0)
    with pytest.raises(ValueError):
        glh.grouped_logits_triton(hidden.to(DEVICE), weight.to(DEVICE), rows.to(DEVICE),
                                  gids.to(DEVICE), 16, path="gather")


@pytest.mark.parametrize("n,k", [(3, 2), (40, 4)])   # gather strategy, then score-all
def test_torch_reference_matches_dense(n, k):
    """grouped_logits_torch (the CPU path and the kernels' reference) == dense head."""
    vocab, G, d = 150, 16, 32      # 10 groups, ragged last one
    head, _, weight, rows, hidden, gids = make_case(vocab, G, d, n, k, torch.float32, 7,
                                                    "dups")
    ref, ref_tok = reference(head, hidden, gids, rows, G, 0.5)
    got, tok = grouped_logits_torch(hidden, weight, rows, gids, G, 0.5)
    assert torch.equal(tok, ref_tok)
    assert_logits(got, ref, torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("path", ["per_token", "union", "dense"])
def test_cuda_graph_capture(path):
    head, _, weight, rows, hidden, gids = make_case(1000, 64, 128, 4, 3, torch.bfloat16, 3)
    h, w, rt, gi = (t.cuda() for t in (hidden.to(torch.bfloat16), weight, rows, gids))
    out_v = torch.empty(4, device="cuda")
    out_t = torch.empty(4, dtype=torch.int64, device="cuda")
    glh.grouped_top1_triton(h, w, rt, gi, 64, 1.0, out_v, out_t, path=path)  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        glh.grouped_top1_triton(h, w, rt, gi, 64, 1.0, out_v, out_t, path=path)
    new_gids = torch.randint(0, gids.max().item() + 1, gids.shape)
    gi.copy_(new_gids.cuda())
    h.copy_(torch.randn_like(h))
    out_v.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    ref, _ = reference(head, h.float().cpu(), new_gids, rows, 64)
    torch.testing.assert_close(out_v.cpu().double(), ref.max(1).values, rtol=1e-2, atol=1e-2)
