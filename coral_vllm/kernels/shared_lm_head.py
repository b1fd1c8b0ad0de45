"""Triton kernel for batch-shared groups (`coral_vllm.head.shared_lm_head`, whose
`shared_logits_torch` is the reference): the n tokens of a draft step scored over one
shared list of U groups, each selected row read once for all of them.

Layout as in `kernels.grouped_lm_head`: `grouped_weight` [N*G, d] in group order,
`row_tokens` [N*G] (-1 on padding rows), `groups` [U] int64 the shared group ids.
Column j*G + c of every token is row groups[j]*G + c.

Program (j, rb, t) streams the BLOCK_R x d weight block rb of group groups[j] once and
multiplies it against token tile t (BLOCK_N tokens, one tile while n <= 64) with
`tl.dot` (`_tile_scores`, the union kernel's loop), then writes the tile's logits, or
(top-1) one (max, token) partial per token into a fixed [n, U, NB] scratch that
`top1_reduce` reduces to [n]. Unlike the union kernel it launches programs for
the U shared groups only (no scan of the other N - U), and the rows read per step are
U*G whatever n is: the static head's count. At n = 1 the shared list is one token's
own groups, so the call goes to `kernels.grouped_lm_head` with its path rule (the
per-token path unless U >= N/2).

Graph safety: fixed output shapes, no `.item()`, host decisions from shapes only.
`groups` are not range-checked (that would need a sync).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from coral_vllm.kernels.grouped_lm_head import (_TARGET_PROGRAMS, _check, _interpreting,
                                                _next_pow2, _tile_scores,
                                                grouped_logits_triton, grouped_top1_triton,
                                                top1_reduce)


@triton.jit
def _shared_kernel(h_ptr, w_ptr, rt_ptr, gid_ptr, out_ptr, tok_ptr, n_tokens, U, d, G, NB,
                   scale, stride_h, stride_w, TOP1: tl.constexpr, IEEE: tl.constexpr,
                   UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    j = tl.program_id(0)                                   # slot in the shared list
    rb = tl.program_id(1)
    tile = tl.program_id(2)
    g = tl.load(gid_ptr + j).to(tl.int64)
    tn = tl.arange(0, BLOCK_N)
    ti64 = (tile * BLOCK_N + tn).to(tl.int64)
    tmask = ti64 < n_tokens
    cl = tl.arange(0, BLOCK_R)
    c = rb * BLOCK_R + cl
    cmask = c < G
    # 64-bit block bases + 32-bit in-tile offsets, as in the union kernel
    w_rows = (w_ptr + (g * G + rb * BLOCK_R) * stride_w) + cl[:, None] * stride_w
    h_rows = (h_ptr + tile.to(tl.int64) * BLOCK_N * stride_h) + tn[:, None] * stride_h
    acc = _tile_scores(h_rows, w_rows, tmask, cmask, d, d, IEEE, UPCAST, BLOCK_N, BLOCK_R,
                       BLOCK_D)
    tok = tl.load(rt_ptr + g * G + c, mask=cmask, other=-1)
    logit = tl.where((tok >= 0)[None, :], acc * scale, float("-inf"))
    if TOP1:
        best = tl.max(logit, axis=1)                         # [BLOCK_N]
        arg_c = rb * BLOCK_R + tl.argmax(logit, axis=1)      # first max
        best_tok = tl.load(rt_ptr + g * G + arg_c, mask=tmask & (arg_c < G), other=-1)
        slot = (ti64 * U + j) * NB + rb                      # scratch [n, U, NB]
        tl.store(out_ptr + slot, best, mask=tmask)
        tl.store(tok_ptr + slot, best_tok, mask=tmask)
    else:
        col = ti64[:, None] * (U * G) + j * G + c[None, :]
        tl.store(out_ptr + col, logit, mask=tmask[:, None] & cmask[None, :])
        first_tile = (tl.full((BLOCK_R,), 0, tl.int32) + tile) == 0   # tile 0 writes them
        tl.store(tok_ptr + j * G + c, tok, mask=cmask & first_tile)


def _shared_config(n: int, U: int, G: int, config: dict | None) -> dict:
    """Block sizes: the union kernel's token tile; the largest row block that still
    gives ~4 programs per SM (a few shared groups need small blocks to fill the GPU),
    but not below the token tile, since every program reads the whole tile's hidden
    states (from L2): below it those reads would outweigh the weight block's. Not yet
    tuned on a GPU (`config=` overrides; `bench grouped-lm-head` times the defaults)."""
    cfg = dict(config or {})
    bn = cfg.get("BLOCK_N") or min(64, max(16, _next_pow2(n)))
    br = cfg.get("BLOCK_R")
    if br is None:
        br = bn
        for cand in (128, 64, 32):
            if cand > bn and U * triton.cdiv(G, cand) * triton.cdiv(n, bn) >= _TARGET_PROGRAMS:
                br = cand
                break
    return dict(BLOCK_N=bn, BLOCK_R=br, BLOCK_D=cfg.get("BLOCK_D") or 64,
                num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 4))


def _launch(hidden, grouped_weight, row_tokens, groups, group_size, scale, out_a, out_b,
            top1, cfg):
    n, U = hidden.shape[0], groups.numel()
    _, _, _, d = _check(hidden, grouped_weight, row_tokens, groups.view(1, U).expand(n, U),
                        group_size)
    G = group_size
    # rounded to the weight dtype here, as in `kernels.grouped_lm_head._launch`
    hidden = hidden.to(grouped_weight.dtype).contiguous()
    w = grouped_weight.contiguous()
    nb = triton.cdiv(G, cfg["BLOCK_R"])
    grid = (U, nb, triton.cdiv(n, cfg["BLOCK_N"]))
    _shared_kernel[grid](hidden, w, row_tokens.contiguous(), groups.contiguous(), out_a,
                         out_b, n, U, d, G, nb, float(scale), hidden.stride(0),
                         w.stride(0), TOP1=top1, IEEE=w.dtype == torch.float32,
                         UPCAST=_interpreting(), BLOCK_N=cfg["BLOCK_N"],
                         BLOCK_R=cfg["BLOCK_R"], BLOCK_D=cfg["BLOCK_D"],
                         num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def shared_logits_triton(hidden, grouped_weight, row_tokens, groups, group_size, scale=1.0,
                         *, config=None):
    """(logits float32 [n, U*G], token ids int64 [U*G]); padding columns -inf / -1.

    `config`: optional overrides for tuning (BLOCK_N, BLOCK_R, BLOCK_D, num_warps,
    num_stages)."""
    n, U = hidden.shape[0], groups.numel()
    if n == 1:   # one token's own groups: the grouped head's own paths
        logits, tokens = grouped_logits_triton(hidden, grouped_weight, row_tokens,
                                               groups.view(1, U), group_size, scale)
        return logits, tokens.view(-1)
    logits = torch.empty((n, U * group_size), dtype=torch.float32, device=hidden.device)
    tokens = torch.empty((U * group_size,), dtype=torch.int64, device=hidden.device)
    if n > 0:
        _launch(hidden, grouped_weight, row_tokens, groups, group_size, scale, logits,
                tokens, False, _shared_config(n, U, group_size, config))
    return logits, tokens


def shared_top1_triton(hidden, grouped_weight, row_tokens, groups, group_size, scale=1.0,
                       *, config=None):
    """(max logit float32 [n], its token id int64 [n]) over the shared groups, fused: the
    kernel leaves (max, token) partials in a fixed [n, U * NB] scratch and a second tiny
    kernel reduces them (no scratch when there is one partial per token). Ties: some
    token with the maximal logit."""
    n, U = hidden.shape[0], groups.numel()
    if n == 1:
        return grouped_top1_triton(hidden, grouped_weight, row_tokens, groups.view(1, U),
                                   group_size, scale)
    values = torch.empty((n,), dtype=torch.float32, device=hidden.device)
    tokens = torch.empty((n,), dtype=torch.int64, device=hidden.device)
    if n == 0:
        return values, tokens
    cfg = _shared_config(n, U, group_size, config)
    m = U * triton.cdiv(group_size, cfg["BLOCK_R"])
    if m == 1:
        _launch(hidden, grouped_weight, row_tokens, groups, group_size, scale, values,
                tokens, True, cfg)
        return values, tokens
    scratch_v = torch.empty((n, m), dtype=torch.float32, device=hidden.device)
    scratch_t = torch.empty((n, m), dtype=torch.int64, device=hidden.device)
    _launch(hidden, grouped_weight, row_tokens, groups, group_size, scale, scratch_v,
            scratch_t, True, cfg)
    return top1_reduce(scratch_v, scratch_t, values, tokens)
