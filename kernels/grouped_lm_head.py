"""Triton kernels for the grouped LM head (CORAL drafter): logits and fused top-1.

Layout (see `coral_vllm/grouped_head.py`, whose `grouped_logits_torch` is the reference):
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
(NB = ceil(G / BLOCK_R)), and a second tiny kernel reduces that to [n].

Two paths, chosen from static shapes only (see `choose_path`):

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

Path rule (`choose_path`): union if n >= UNION_MIN_TOKENS (16) or n*k >= N; per-token
otherwise. Reason: with independent choices the per-token/union byte ratio is
n*k / (N*(1-(1-k/N)^n)), i.e. ~1 while n*k << N, 1.3-1.6 at n*k = N and growing with n,
while the union path pays a group-id scan per program and pads tokens to a 16-row dot
tile. Both paths are correct for every shape; `path=` forces one (the benchmark times
both, to move the threshold).

Every (token, slot, row block) is written by exactly one program in either path (program
(group_ids[i, j], rb) in the union path), so outputs need no initialisation. Duplicate
groups within one token's k are handled (rare branch inside the union kernel).

Graph safety: fixed output shapes, no `.item()`, no data-dependent host branches; the only
host-side decisions use shapes and dtypes. group_ids are not range-checked (that would
need a sync): values outside [0, N) read out of bounds.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

UNION_MIN_TOKENS = 16
_TARGET_PROGRAMS = 528  # ~4 per SM on a 132-SM H100


def choose_path(n: int, k: int, num_groups: int) -> str:
    """Static path rule; see the module docstring."""
    if n >= UNION_MIN_TOKENS or n * k >= num_groups:
        return "union"
    return "per_token"


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
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for d0 in range(0, d_end, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < d
        hv = tl.load(h_rows + dd[None, :], mask=hit[:, None] & dmask[None, :], other=0.0)
        wv = tl.load(w_rows + dd[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
        if UPCAST:   # interpreter only: its tl.dot mis-handles bf16 operands
            acc = tl.dot(hv.to(tl.float32), tl.trans(wv.to(tl.float32)), acc,
                         input_precision="ieee")
        elif IEEE:
            acc = tl.dot(hv, tl.trans(wv), acc, input_precision="ieee")
        else:
            acc = tl.dot(hv, tl.trans(wv), acc)
    tok = tl.load(rt_ptr + rows, mask=cmask, other=-1)
    valid = tok >= 0
    logit = tl.where(valid[None, :], acc * scale, float("-inf"))
    if TOP1:
        best = tl.max(logit, axis=1)                              # [BLOCK_N]
        arg = tl.argmax(logit, axis=1)                            # first max
        arg_c = rb * BLOCK_R + arg
        best_tok = tl.load(rt_ptr + g.to(tl.int64) * G + arg_c,
                           mask=hit & (arg_c < G), other=-1)
        slot = (ti64 * k + jfirst) * NB + rb
        tl.store(out_ptr + slot, best, mask=hit)
        tl.store(tok_ptr + slot, best_tok, mask=hit)
        if max_hit > 1:                                           # duplicate group in a
            for j in range(0, k):                                 # token's k (rare)
                gj = tl.load(gid_ptr + ti64 * k + j, mask=tmask, other=-1)
                m = (gj == g) & (j != jfirst)
                slot_j = (ti64 * k + j) * NB + rb
                tl.store(out_ptr + slot_j, best, mask=m)
                tl.store(tok_ptr + slot_j, best_tok, mask=m)
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
            top1, path, config):
    n, k, num_groups, d = _check(hidden, grouped_weight, row_tokens, group_ids, group_size)
    G = group_size
    # round hidden to the weight dtype, as the reference does (a no-op when they match,
    # the serving case); done here because the interpreter's in-kernel fp32->bf16 cast
    # truncates instead of rounding
    hidden = hidden.to(grouped_weight.dtype).contiguous()
    w = grouped_weight.contiguous()
    rt = row_tokens.contiguous()
    if path == "auto":
        path = choose_path(n, k, num_groups)
    gids = group_ids.contiguous()
    if path == "per_token":
        cfg = _per_token_config(n, k, G, d, config)
    elif path == "union":
        cfg = _union_config(n, k, G, d, config)
    else:
        raise ValueError(f"path must be 'auto', 'per_token' or 'union', not {path!r}")
    nb = triton.cdiv(G, cfg["BLOCK_R"])
    if n == 0 or k == 0:
        return out_a, out_b
    if path == "per_token":
        grid = (n * k, nb)
        _per_token_kernel[grid](hidden, w, rt, gids, out_a, out_b, n, k, d, G, nb,
                                float(scale), hidden.stride(0), w.stride(0), TOP1=top1,
                                BLOCK_R=cfg["BLOCK_R"], BLOCK_D=cfg["BLOCK_D"],
                                STAGES=cfg["num_stages"],
                                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    else:
        grid = (num_groups, nb, triton.cdiv(n, cfg["BLOCK_N"]))
        _union_kernel[grid](hidden, w, rt, gids, out_a, out_b, n, k, d, G, nb,
                            float(scale), hidden.stride(0), w.stride(0), TOP1=top1,
                            IEEE=w.dtype == torch.float32, UPCAST=_interpreting(),
                            BLOCK_N=cfg["BLOCK_N"],
                            BLOCK_K=cfg["BLOCK_K"], BLOCK_R=cfg["BLOCK_R"],
                            BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"],
                            num_stages=cfg["num_stages"])
    return out_a, out_b


def grouped_logits_triton(hidden, grouped_weight, row_tokens, group_ids, group_size,
                          scale=1.0, out_logits=None, out_tokens=None, *, path="auto",
                          config=None):
    """(logits float32 [n, k*G], token ids int64 [n, k*G]); padding columns -inf / -1.

    `path`: "auto" (static rule, `choose_path`), "per_token" or "union". `config`: optional
    block-size overrides (BLOCK_R, BLOCK_D, BLOCK_N, num_warps, num_stages) for tuning.
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
    return _launch(hidden, grouped_weight, row_tokens, group_ids, group_size, scale,
                   out_logits, out_tokens, False, path, config)


def grouped_top1_triton(hidden, grouped_weight, row_tokens, group_ids, group_size,
                        scale=1.0, out_values=None, out_tokens=None, *, path="auto",
                        config=None):
    """(max logit float32 [n], its token id int64 [n]) over the active groups, fused.

    Pass 1 writes one (max, token) per (token, slot, row block) into a scratch of fixed
    shape [n, k, ceil(G / BLOCK_R)]; pass 2 reduces it per token. Ties: some token with
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
    num_rows = grouped_weight.shape[0]
    p = path if path != "auto" else choose_path(n, k, num_rows // group_size)
    cfg = (_per_token_config if p == "per_token" else _union_config)(
        n, k, group_size, grouped_weight.shape[1], config)
    nb = triton.cdiv(group_size, cfg["BLOCK_R"])
    m = k * nb
    scratch_v = torch.empty((n, m), dtype=torch.float32, device=hidden.device)
    scratch_t = torch.empty((n, m), dtype=torch.int64, device=hidden.device)
    if n == 0:
        return out_values, out_tokens
    _launch(hidden, grouped_weight, row_tokens, group_ids, group_size, scale, scratch_v,
            scratch_t, True, p, config)
    block = min(1024, max(16, _next_pow2(m)))
    _top1_reduce_kernel[(n,)](scratch_v, scratch_t, out_values, out_tokens, m, BLOCK=block,
                              num_warps=4)
    return out_values, out_tokens
