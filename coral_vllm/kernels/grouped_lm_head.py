"""Triton kernels for the grouped LM head (CORAL drafter): logits and fused top-1.

Layout (see `coral_vllm/head/grouped_lm_head.py`, whose `grouped_logits_torch` is the
reference):
`grouped_weight` [N*G, d] holds the LM-head rows reordered so vocabulary group g is the
contiguous slab of rows [g*G, (g+1)*G); `row_tokens` [N*G] int64 is the token id of every
row (-1 on the zero padding rows of a ragged last group); `group_ids` [n, k] int64 are the
k groups each of the n tokens activated. Column j*G + c of token i is row group_ids[i,j]*G + c;
padding columns get -inf.

Why a kernel: the draft step is a matrix-vector product over a few per-cent of the head,
i.e. pure memory traffic. Gathering rows in torch materialises an [n, k, G, d] copy (read
once, written once, read again), and the dense head reads all V rows. These kernels read
each needed row straight from the grouped weight, accumulate in fp32, and (top-1 variant)
never write the [n, k*G] logits: each program leaves one (max, token) pair per
(token, group slot, row block) in a small fixed-size scratch [n, k, NB]
(NB = ceil(G / BLOCK_R)), and a second tiny kernel reduces that to [n] (skipped when
there is one partial per token, which the dense path arranges for short rows).

Three paths, chosen from static shapes only (see `choose_path`):

* per-token  -- program (i*k + j, rb) reads rows [rb*BLOCK_R, ...) of group group_ids[i, j]
  and dots them with hidden[i] (fp32 multiply + row sums; no tensor cores needed for a
  mat-vec). n*k*NB programs: at n = 1 the row-block size is picked so there are enough of
  them to fill the GPU. A group chosen by several tokens is read once per token (L2 may
  absorb some of it).
* union      -- program (g, rb, token tile) loads the group ids ([n, k], tiny and L2
  resident), sees which tokens chose group g and runs its d-loop with a zero trip count
  if none did (an early exit that keeps the loop outside any `if`, so it stays
  software-pipelined); otherwise streams its BLOCK_R x d weight block ONCE per token tile
  (one tile while n <= 64) and multiplies it against the padded tile of those tokens with
  `tl.dot` (BLOCK_N x BLOCK_R, fp32 accumulation), then writes only the (token, slot)
  columns that chose g. A batch whose choices cover the whole vocabulary costs about a
  dense head.
* dense      -- when the batch covers (almost) every group anyway, one cuBLAS matmul
  scores every row (`hidden @ grouped_weight.T`, fp32 accumulation, output in the weight
  dtype like the dense head it replaces), then `_select_kernel` reads only each token's
  k*G active columns of those [n, N*G] scores and writes the logits, or (top-1) one
  (max, token) per BLOCK columns. Extra over the dense head: the select launch and the
  n*k*G selected scores it reads (and, for logits, the outputs): 3-5 us on the H200 at
  the 54 MiB head, 4-16 us on the larger ones (top-1). It exists for the small heads, where the
  union kernel's per-program fixed costs (group-id scan over a [BLOCK_N, BLOCK_K] tile,
  pipeline prologue, per-slot stores) are spread over only d/64 ~ 9-10 loop iterations.

Path rule (`choose_path`, static shapes only). Fitted to the H200 run of kernel v2
(`benchmarks/results/lm_head.json`: 5 heads x n in {1, 4, 16, 64} x k in {8, 16, 32, 64}
of N = 256 groups, bf16, top-1, every path forced in every cell, 5 rounds);
c = 1 - (1 - k/N)^n is the expected fraction of groups an independent batch covers:
* per-token if n*k < UNION_MIN_LOAD * N (N/2). Per-token was the faster of the two in all
  30 cells with n*k <= N/4 (union 2-177% slower), union in all 10 cells at n*k = N/2
  (per-token 0.3-9% slower) and in all 40 above. With independent choices the
  per-token/union byte ratio is n*k / (N*c) (1.0-1.1 at n*k = N/4, 1.2-1.3 at N/2,
  growing with n*k), while the union path pays a group-id scan per program and pads tokens to a
  16-row dot tile; N/2 is the smallest load at which union was measured faster.
* dense if n >= DENSE_MIN_TOKENS (64), c >= DENSE_MIN_COVERED (0.8) and the head is at
  most DENSE_MAX_HEAD_BYTES (128 MiB). At n = 64 (a 64-token union tile, whose fixed cost
  grows with k: union exceeded cuBLAS by 3.8 / 5.0 / 6.6 / 9.1 us at k = 8..64 on the
  54 MiB SmolLM2 head, the dense path by 3.1-5.4 us) the dense path was faster on that
  head in all 4 cells (by 3-13%), while at n = 64 union was faster or within 1% on every
  head of 320 MiB and up (Gemma-3-270M's and larger), where the dense path's own excess
  is 5-16 us. At n = 16 union won on the 54 MiB head (the dense path 4-9% slower). The boundary lies between
  54 and 320 MiB; 128 MiB is about their geometric middle (no head in between was
  measured). No row at n >= 64 had c < 0.869; the floor keeps the dense path from
  reading the whole head for a batch that leaves a fifth of it unread.
* else union.
On that run the rule's path was the fastest forced path, or within 2% of it, in 79 of 80
cells; the exception is the two Qwen heads (594-row groups) at n = 16, k = 64, where the
dense path beat union by 2% (1.5B) and 6% (7B) while on Llama's head union won by 1%:
no shape feature of one cell is worth a rule. Not measured: n > 64 (the union path then
streams every covered weight block once per 64-token tile), other GPUs, the logits path
(same rule; the benchmark times top-1). (The H100 v1 rule, dense at d < 1024 by
uncovered bytes and union at n >= 16 or n*k >= N, lost 1-10% to union in 6 of its 10
dense picks on the H200, and its per-token picks at n = 4, k = N/8 lost 0.3-6%.)
Every path is correct for every shape; `path=` forces one (the benchmark times all
three; `bench grouped-lm-head --replay` predicts a new rule's ratios from them).

Every output element is written by exactly one program in every path (program
(group_ids[i, j], rb) in the union path), so outputs need no initialisation. Duplicate
groups within one token's k are handled: free in the per-token and dense paths; in the
union kernel by a masked [BLOCK_N, k] slot store (top-1) or a loop over k taken only
when some token has a duplicate (logits).

Graph safety: fixed output shapes, no `.item()`, no data-dependent host branches; the only
host-side decisions use shapes and dtypes (the dense path's [n, N*G] scores are a
fixed-shape temporary, taken from the graph's memory pool under capture). group_ids are
not range-checked (that would need a sync): values outside [0, N) read out of bounds.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

UNION_MIN_LOAD = 0.5          # union from n*k >= N/2 (expected slots per group)
DENSE_MIN_TOKENS = 64
DENSE_MIN_COVERED = 0.8
DENSE_MAX_HEAD_BYTES = 128 << 20
_TARGET_PROGRAMS = 528  # ~4 per SM on a 132-SM H100
_ONE_PASS_MAX_COLS = 16384  # dense path top-1: <= 4 loop trips of 4096 columns


def choose_path(n: int, k: int, num_groups: int, group_size: int, d: int,
                itemsize: int = 2) -> str:
    """Static path rule from shapes and the weight's element size (no data, so it holds
    under CUDA-graph capture); the constants' evidence is in the module docstring."""
    if n * k < UNION_MIN_LOAD * num_groups:
        return "per_token"
    covered = 1.0 - (1.0 - min(k, num_groups) / num_groups) ** n   # expected, independent
    head_bytes = num_groups * group_size * d * itemsize
    if n >= DENSE_MIN_TOKENS and covered >= DENSE_MIN_COVERED \
            and head_bytes <= DENSE_MAX_HEAD_BYTES:
        return "dense"
    return "union"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


# --------------------------------------------------------------------------- kernels


@triton.jit
def _per_token_kernel(h_ptr, w_ptr, rt_ptr, gid_ptr, out_ptr, tok_ptr,
                      n_tokens, k, d, G, NB, scale, stride_h, stride_w,
                      TOP1: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                      STAGES: tl.constexpr):
    pid = tl.program_id(0)            # i * k + j
    rb = tl.program_id(1)
    i = pid // k
    j = pid % k
    g = tl.load(gid_ptr + pid).to(tl.int64)
    c = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    cmask = c < G
    rows = g * G + c
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    h_row = h_ptr + i.to(tl.int64) * stride_h
    cl = tl.arange(0, BLOCK_R)
    w_rows = (w_ptr + (g * G + rb * BLOCK_R) * stride_w) + cl[:, None] * stride_w
    # explicit stages: Triton only software-pipelines loads that feed a dot unless asked;
    # this gets the weight tiles cp.async-prefetched STAGES-1 iterations ahead
    for d0 in tl.range(0, d, BLOCK_D, num_stages=STAGES):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < d
        hv = tl.load(h_row + dd, mask=dmask, other=0.0).to(tl.float32)
        wv = tl.load(w_rows + dd[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
        acc += wv.to(tl.float32) * hv[None, :]
    logit = tl.sum(acc, axis=1) * scale
    tok = tl.load(rt_ptr + rows, mask=cmask, other=-1)
    logit = tl.where(tok >= 0, logit, float("-inf"))
    if TOP1:
        best = tl.max(logit, axis=0)
        best_tok = tl.max(tl.where(logit == best, tok, -1), axis=0)
        slot = pid.to(tl.int64) * NB + rb      # scratch [n, k, NB]
        tl.store(out_ptr + slot, best)
        tl.store(tok_ptr + slot, best_tok)
    else:
        col = i.to(tl.int64) * (k * G) + j * G + c
        tl.store(out_ptr + col, logit, mask=cmask)
        tl.store(tok_ptr + col, tok, mask=cmask)


@triton.jit
def _tile_scores(h_rows, w_rows, hmask, cmask, d, d_end, IEEE: tl.constexpr,
                 UPCAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """[BLOCK_N, BLOCK_R] fp32 dot products of a token tile (rows `h_rows`, masked by
    `hmask`) with a weight block (rows `w_rows`, masked by `cmask`) over d_end <= d
    columns: the weight block is streamed once for the whole token tile. Shared by the
    union kernel and `kernels.shared_lm_head` (inlined by Triton, so each keeps its own
    software-pipelined loop)."""
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for d0 in range(0, d_end, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < d
        hv = tl.load(h_rows + dd[None, :], mask=hmask[:, None] & dmask[None, :], other=0.0)
        wv = tl.load(w_rows + dd[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
        if UPCAST:   # interpreter only: its tl.dot mis-handles bf16 operands
            acc = tl.dot(hv.to(tl.float32), tl.trans(wv.to(tl.float32)), acc,
                         input_precision="ieee")
        elif IEEE:
            acc = tl.dot(hv, tl.trans(wv), acc, input_precision="ieee")
        else:
            acc = tl.dot(hv, tl.trans(wv), acc)
    return acc


@triton.jit
def _union_kernel(h_ptr, w_ptr, rt_ptr, gid_ptr, out_ptr, tok_ptr,
                  n_tokens, k, d, G, NB, scale, stride_h, stride_w,
                  TOP1: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    g = tl.program_id(0)
    rb = tl.program_id(1)
    ti = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)     # token tile
    tmask = ti < n_tokens
    ti64 = ti.to(tl.int64)
    # which tokens (and which of their k slots) chose group g; the [BLOCK_N, BLOCK_K]
    # tile dies here, only per-token vectors stay live through the main loop
    kk = tl.arange(0, BLOCK_K)
    gids = tl.load(gid_ptr + ti64[:, None] * k + kk[None, :],
                   mask=tmask[:, None] & (kk < k)[None, :], other=-1)
    eq = gids == g
    nhit = tl.sum(eq.to(tl.int32), axis=1)                      # [BLOCK_N]
    jfirst = tl.min(tl.where(eq, kk[None, :], BLOCK_K), axis=1)  # first slot choosing g
    hit = nhit > 0
    max_hit = tl.max(nhit, axis=0)
    # early exit without a branch around the loop (keeps it software-pipelined): no
    # token chose g -> zero trip count and every store below is masked off
    d_end = tl.where(max_hit > 0, d, 0)

    cl = tl.arange(0, BLOCK_R)
    c = rb * BLOCK_R + cl
    cmask = c < G
    rows = g.to(tl.int64) * G + c
    # 64-bit block base + 32-bit in-tile offsets (64-bit offset tiles would cost two
    # registers per element and spill)
    w_rows = (w_ptr + (g.to(tl.int64) * G + rb * BLOCK_R) * stride_w) + cl[:, None] * stride_w
    tn = tl.arange(0, BLOCK_N)
    h_rows = (h_ptr + tl.program_id(2).to(tl.int64) * BLOCK_N * stride_h) + tn[:, None] * stride_h
    acc = _tile_scores(h_rows, w_rows, hit, cmask, d, d_end, IEEE, UPCAST, BLOCK_N,
                       BLOCK_R, BLOCK_D)
    tok = tl.load(rt_ptr + rows, mask=cmask, other=-1)
    valid = tok >= 0
    logit = tl.where(valid[None, :], acc * scale, float("-inf"))
    if TOP1:
        best = tl.max(logit, axis=1)                              # [BLOCK_N]
        arg = tl.argmax(logit, axis=1)                            # first max
        arg_c = rb * BLOCK_R + arg
        best_tok = tl.load(rt_ptr + g.to(tl.int64) * G + arg_c,
                           mask=hit & (arg_c < G), other=-1)
        # every slot that chose g, duplicates within a token's k included, in one masked
        # 2-D store. (v1 looped over k for duplicates: with random choices at k >= 32
        # most programs have one, and k serial load+store trips cost more than the
        # d-loop at small d.) The id tile is reloaded (L1/L2) rather than kept live
        # through the main loop.
        gids = tl.load(gid_ptr + ti64[:, None] * k + kk[None, :],
                       mask=tmask[:, None] & (kk < k)[None, :], other=-1)
        slot = (ti64[:, None] * k + kk[None, :]) * NB + rb
        tl.store(out_ptr + slot, tl.broadcast_to(best[:, None], (BLOCK_N, BLOCK_K)),
                 mask=gids == g)
        tl.store(tok_ptr + slot, tl.broadcast_to(best_tok[:, None], (BLOCK_N, BLOCK_K)),
                 mask=gids == g)
    else:
        m2 = hit[:, None] & cmask[None, :]
        col = ti64[:, None] * (k * G) + jfirst[:, None] * G + c[None, :]
        tl.store(out_ptr + col, logit, mask=m2)
        tl.store(tok_ptr + col, tl.broadcast_to(tok[None, :], (BLOCK_N, BLOCK_R)), mask=m2)
        if max_hit > 1:
            for j in range(0, k):
                gj = tl.load(gid_ptr + ti64 * k + j, mask=tmask, other=-1)
                mj = ((gj == g) & (j != jfirst))[:, None] & cmask[None, :]
                col_j = ti64[:, None] * (k * G) + j * G + c[None, :]
                tl.store(out_ptr + col_j, logit, mask=mj)
                tl.store(tok_ptr + col_j, tl.broadcast_to(tok[None, :], (BLOCK_N, BLOCK_R)),
                         mask=mj)


@triton.jit
def _select_kernel(s_ptr, rt_ptr, gid_ptr, out_ptr, tok_ptr, k, G, last_group, M, SPAN,
                   scale, stride_s, TOP1: tl.constexpr, BLOCK: tl.constexpr):
    # program (i, b) covers columns [b*SPAN, (b+1)*SPAN) of token i's [k*G] output row,
    # BLOCK at a time (logits: SPAN = BLOCK)
    i = tl.program_id(0)
    b = tl.program_id(1)
    i64 = i.to(tl.int64)
    width = k * G
    best_v = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    best_f = tl.zeros((BLOCK,), dtype=tl.int32)
    for f0 in range(b * SPAN, b * SPAN + SPAN, BLOCK):
        f = f0 + tl.arange(0, BLOCK)
        fmask = f < width
        j = f // G
        c = f - j * G
        g = tl.load(gid_ptr + i64 * k + j, mask=fmask, other=0)   # same address per warp
        rows = g * G + c
        s = tl.load(s_ptr + i64 * stride_s + rows, mask=fmask, other=0.0).to(tl.float32)
        if TOP1:
            # padding rows only exist in the ragged last group (layout contract), so row
            # tokens are read for that group only and, elsewhere, just for the winner:
            # all of them would be 4x the bytes of the bf16 scores
            pad = tl.load(rt_ptr + rows, mask=fmask & (g == last_group), other=0)
            logit = tl.where(fmask & (pad >= 0), s * scale, float("-inf"))
            better = logit > best_v
            best_v = tl.where(better, logit, best_v)
            best_f = tl.where(better, f, best_f)
        else:
            tok = tl.load(rt_ptr + rows, mask=fmask, other=-1)
            col = i64 * width + f
            tl.store(out_ptr + col, tl.where(tok >= 0, s * scale, float("-inf")), mask=fmask)
            tl.store(tok_ptr + col, tok, mask=fmask)
    if TOP1:
        best = tl.max(best_v, axis=0)
        fb = tl.max(tl.where(best_v == best, best_f, -1), axis=0)
        jb = fb // G
        gb = tl.load(gid_ptr + i64 * k + jb)
        best_tok = tl.load(rt_ptr + gb * G + (fb - jb * G))
        best_tok = tl.where(best > float("-inf"), best_tok, -1)
        tl.store(out_ptr + i64 * M + b, best)
        tl.store(tok_ptr + i64 * M + b, best_tok)


@triton.jit
def _top1_reduce_kernel(sv_ptr, st_ptr, out_v_ptr, out_t_ptr, M,
                        BLOCK: tl.constexpr):
    i = tl.program_id(0)
    base = i.to(tl.int64) * M
    best_v = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    best_t = tl.full((BLOCK,), -1, dtype=tl.int64)
    for m0 in range(0, M, BLOCK):
        mm = m0 + tl.arange(0, BLOCK)
        mask = mm < M
        v = tl.load(sv_ptr + base + mm, mask=mask, other=float("-inf"))
        t = tl.load(st_ptr + base + mm, mask=mask, other=-1)
        better = v > best_v
        best_v = tl.where(better, v, best_v)
        best_t = tl.where(better, t, best_t)
    top = tl.max(best_v, axis=0)
    top_t = tl.max(tl.where(best_v == top, best_t, -1), axis=0)
    tl.store(out_v_ptr + i, top)
    tl.store(out_t_ptr + i, top_t)


# --------------------------------------------------------------------------- launchers


def _per_token_config(n, k, G, d, config):
    cfg = dict(config or {})
    br = cfg.get("BLOCK_R")
    if br is None:
        br = 8
        for cand in (64, 32, 16):
            if n * k * triton.cdiv(G, cand) >= _TARGET_PROGRAMS:
                br = cand
                break
    bd = cfg.get("BLOCK_D") or min(_next_pow2(d), max(64, 8192 // br))
    return dict(BLOCK_R=br, BLOCK_D=bd, num_warps=cfg.get("num_warps", 4),
                num_stages=cfg.get("num_stages", 3))


def _union_config(n, k, G, d, config):
    cfg = dict(config or {})
    bn = cfg.get("BLOCK_N") or min(64, max(16, _next_pow2(n)))
    # 128-row blocks halve the hidden-tile re-reads (from L2) per weight byte compared
    # with 64; small groups keep 64 so less of the tile is masked off
    br = cfg.get("BLOCK_R") or (128 if G >= 128 else 64)
    bd = cfg.get("BLOCK_D") or 64
    return dict(BLOCK_N=bn, BLOCK_R=br, BLOCK_D=bd, BLOCK_K=max(2, _next_pow2(k)),
                num_warps=cfg.get("num_warps", 4), num_stages=cfg.get("num_stages", 4))


def _dense_config(n, k, G, top1, config):
    cfg = dict(config or {})
    width = k * G
    # top-1 with a short row: one program per token loops over all its columns and
    # writes the answer itself, saving the reduce launch (~1-2 us, which is ~5% of the
    # small heads' dense time); long rows are split so enough programs stream them
    one_pass = top1 and cfg.get("ONE_PASS", width <= _ONE_PASS_MAX_COLS)
    blk = cfg.get("BLOCK")
    if blk is None:
        if one_pass:
            blk = min(4096, max(256, _next_pow2(width)))
        else:   # the largest block that still gives ~4 programs per SM
            blk = 256
            for cand in (1024, 512):
                if n * triton.cdiv(width, cand) >= _TARGET_PROGRAMS:
                    blk = cand
                    break
    span = triton.cdiv(width, blk) * blk if one_pass else blk
    # SCORES_FP32: cuBLAS writes fp32 scores instead of weight-dtype ones (CUDA only;
    # costs n*N*G*2 more bytes, ~9% of the dense head at d=640, n=64); a tuning knob
    return dict(BLOCK=blk, SPAN=span, SCORES_FP32=cfg.get("SCORES_FP32", False),
                num_warps=cfg.get("num_warps", 8 if blk >= 2048 else 4))


def _plan(n, k, G, d, num_groups, itemsize, path, top1, config):
    """(path, launch config, top-1 partials per token), from static shapes only."""
    if path == "auto":
        path = choose_path(n, k, num_groups, G, d, itemsize)
    if path == "per_token":
        cfg = _per_token_config(n, k, G, d, config)
        return path, cfg, k * triton.cdiv(G, cfg["BLOCK_R"])
    if path == "union":
        cfg = _union_config(n, k, G, d, config)
        return path, cfg, k * triton.cdiv(G, cfg["BLOCK_R"])
    if path == "dense":
        cfg = _dense_config(n, k, G, top1, config)
        return path, cfg, triton.cdiv(k * G, cfg["SPAN"])
    raise ValueError(f"path must be 'auto', 'per_token', 'union' or 'dense', not {path!r}")


def _check(hidden, grouped_weight, row_tokens, group_ids, group_size):
    n, k = group_ids.shape
    num_rows, d = grouped_weight.shape
    if hidden.dim() != 2 or hidden.shape != (n, d):
        raise ValueError(f"hidden {tuple(hidden.shape)} must be [n={n}, d={d}]")
    if num_rows % group_size:
        raise ValueError(f"grouped_weight rows {num_rows} not a multiple of G={group_size}")
    if row_tokens.shape != (num_rows,):
        raise ValueError(f"row_tokens {tuple(row_tokens.shape)} must be [{num_rows}]")
    if grouped_weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"unsupported weight dtype {grouped_weight.dtype}")
    return n, k, num_rows // group_size, d


def _launch(hidden, grouped_weight, row_tokens, group_ids, group_size, scale, out_a, out_b,
            top1, path, cfg, m):
    n, k, num_groups, d = _check(hidden, grouped_weight, row_tokens, group_ids, group_size)
    G = group_size
    # round hidden to the weight dtype, as the reference does (a no-op when they match,
    # the serving case); done here because the interpreter's in-kernel fp32->bf16 cast
    # truncates instead of rounding
    hidden = hidden.to(grouped_weight.dtype).contiguous()
    w = grouped_weight.contiguous()
    rt = row_tokens.contiguous()
    gids = group_ids.contiguous()
    if n == 0 or k == 0:
        return out_a, out_b
    if path == "per_token":
        grid = (n * k, triton.cdiv(G, cfg["BLOCK_R"]))
        _per_token_kernel[grid](hidden, w, rt, gids, out_a, out_b, n, k, d, G, grid[1],
                                float(scale), hidden.stride(0), w.stride(0), TOP1=top1,
                                BLOCK_R=cfg["BLOCK_R"], BLOCK_D=cfg["BLOCK_D"],
                                STAGES=cfg["num_stages"],
                                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    elif path == "union":
        grid = (num_groups, triton.cdiv(G, cfg["BLOCK_R"]), triton.cdiv(n, cfg["BLOCK_N"]))
        _union_kernel[grid](hidden, w, rt, gids, out_a, out_b, n, k, d, G, grid[1],
                            float(scale), hidden.stride(0), w.stride(0), TOP1=top1,
                            IEEE=w.dtype == torch.float32, UPCAST=_interpreting(),
                            BLOCK_N=cfg["BLOCK_N"],
                            BLOCK_K=cfg["BLOCK_K"], BLOCK_R=cfg["BLOCK_R"],
                            BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"],
                            num_stages=cfg["num_stages"])
    else:
        if cfg["SCORES_FP32"] and w.dtype != torch.float32:
            scores = torch.mm(hidden, w.T, out_dtype=torch.float32)
        else:   # fp32 accumulation inside cuBLAS, one rounding to the weight dtype
            scores = torch.mm(hidden, w.T)
        grid = (n, triton.cdiv(k * G, cfg["SPAN"]))
        _select_kernel[grid](scores, rt, gids, out_a, out_b, k, G, num_groups - 1, m,
                             cfg["SPAN"], float(scale), scores.stride(0), TOP1=top1,
                             BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"])
    return out_a, out_b


def grouped_logits_triton(hidden, grouped_weight, row_tokens, group_ids, group_size,
                          scale=1.0, out_logits=None, out_tokens=None, *, path="auto",
                          config=None):
    """(logits float32 [n, k*G], token ids int64 [n, k*G]); padding columns -inf / -1.

    `path`: "auto" (static rule, `choose_path`), "per_token", "union" or "dense".
    `config`: optional block-size overrides for tuning (BLOCK_R, BLOCK_D, BLOCK_N,
    num_warps, num_stages; dense path: BLOCK, SCORES_FP32, num_warps).
    """
    n, k = group_ids.shape
    width = k * group_size
    if out_logits is None:
        out_logits = torch.empty((n, width), dtype=torch.float32, device=hidden.device)
    if out_tokens is None:
        out_tokens = torch.empty((n, width), dtype=torch.int64, device=hidden.device)
    if out_logits.shape != (n, width) or out_logits.dtype != torch.float32 \
            or not out_logits.is_contiguous():
        raise ValueError("out_logits must be a contiguous float32 [n, k*G] tensor")
    if out_tokens.shape != (n, width) or out_tokens.dtype != torch.int64 \
            or not out_tokens.is_contiguous():
        raise ValueError("out_tokens must be a contiguous int64 [n, k*G] tensor")
    p, cfg, m = _plan(n, k, group_size, grouped_weight.shape[1],
                      grouped_weight.shape[0] // group_size,
                      grouped_weight.element_size(), path, False, config)
    return _launch(hidden, grouped_weight, row_tokens, group_ids, group_size, scale,
                   out_logits, out_tokens, False, p, cfg, m)


def grouped_top1_triton(hidden, grouped_weight, row_tokens, group_ids, group_size,
                        scale=1.0, out_values=None, out_tokens=None, *, path="auto",
                        config=None):
    """(max logit float32 [n], its token id int64 [n]) over the active groups, fused.

    Pass 1 writes (max, token) partials into a scratch of fixed shape [n, m] (per token,
    slot and row block: m = k * ceil(G / BLOCK_R); dense path: one per BLOCK selected
    columns, m = ceil(k*G / BLOCK)); pass 2 reduces it per token. Ties: some token with
    the maximal logit (not necessarily the lowest id).
    """
    n, k = group_ids.shape
    if out_values is None:
        out_values = torch.empty((n,), dtype=torch.float32, device=hidden.device)
    if out_tokens is None:
        out_tokens = torch.empty((n,), dtype=torch.int64, device=hidden.device)
    if out_values.shape != (n,) or out_values.dtype != torch.float32:
        raise ValueError("out_values must be a float32 [n] tensor")
    if out_tokens.shape != (n,) or out_tokens.dtype != torch.int64:
        raise ValueError("out_tokens must be an int64 [n] tensor")
    p, cfg, m = _plan(n, k, group_size, grouped_weight.shape[1],
                      grouped_weight.shape[0] // group_size,
                      grouped_weight.element_size(), path, True, config)
    if n == 0:
        return out_values, out_tokens
    if m == 1:   # one partial per token is the answer: no scratch, no reduce launch
        _launch(hidden, grouped_weight, row_tokens, group_ids, group_size, scale,
                out_values, out_tokens, True, p, cfg, m)
        return out_values, out_tokens
    scratch_v = torch.empty((n, m), dtype=torch.float32, device=hidden.device)
    scratch_t = torch.empty((n, m), dtype=torch.int64, device=hidden.device)
    _launch(hidden, grouped_weight, row_tokens, group_ids, group_size, scale, scratch_v,
            scratch_t, True, p, cfg, m)
    return top1_reduce(scratch_v, scratch_t, out_values, out_tokens)


def top1_reduce(scratch_v, scratch_t, out_values, out_tokens):
    """Reduces top-1 partials [n, m] (value, token) to the outputs [n]: the largest value,
    among equal ones the largest token id."""
    n, m = scratch_v.shape
    _top1_reduce_kernel[(n,)](scratch_v, scratch_t, out_values, out_tokens, m,
                              BLOCK=min(1024, max(16, _next_pow2(m))), num_warps=4)
    return out_values, out_tokens
