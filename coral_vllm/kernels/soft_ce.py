"""Triton kernels for the drafter's distillation loss ("soft_ce"): one chunk of rows, one
drafting step, logits in, per-row loss and the logits' gradient out.

The reference is the torch path of `coral_vllm.training.losses._ChunkedSoftCE` (and
`soft_ce_reference`), which these kernels replace on CUDA when there is no top-K term.

Why a kernel: after the two matmuls (`preds @ W.T` for the drafter, `feats @ W.T` for the
target) the torch path spends its time in some ten float32 elementwise passes over each
[chunk, V] tensor (the float copy, softmax, log-sum-exp as max + sub + exp + sum, p * z +
sum, argmax, sub, exp, sub, the cast back), all of them memory-bound. On an H200 (a
contended host) that was ~77% of the GPU kernel time of a SmolLM2 training step
(docs/training.md); what the kernels gain there is not measured yet. Here each
row is one program that reads its drafter logits z and target logits t twice, in their
own dtype (bf16 in training), and writes the gradient once:

* `soft_ce_target` (once per chunk): the row max m_t and log sum_v exp(t_v - m_t) (their
  sum is logsumexp(t)), and argmax t (the target's top-1), one online pass over t;
* `soft_ce_step` (once per chunk and step): pass 1 keeps an online max / sum-exp of z
  (giving lse_z and argmax z) and sum_v p_v z_v with p = softmax(t); the row's
  cross-entropy is -sum_v p_v log softmax(z)_v = lse_z - sum_v p_v z_v (p sums to one).
  Pass 2 writes d ce / d z = softmax(z) - p, in z's dtype, over z itself; the caller
  multiplies it by W for the gradient of the drafter's features.

Softmaxes are exp((x - max) - log sum exp(x - max)), not exp(x - lse): lse rounded to
float32 is off by up to half an ulp of the max (6e-5 at logits near 2000), which would
shift every probability by that much relatively; x - max is rounded relative to itself
(exact near the max), as in torch's softmax. Everything is
accumulated in float32; beyond the torch path's rounding there is the order of the
sums. Ties in argmax go to the first (lowest) index, torch.argmax's rule.
NaN logits are not handled (torch.argmax would return the NaN's index; here it is
skipped by the comparisons, and the sums turn NaN).

Graph safety: fixed output shapes, no host reads; the launch depends on shapes and
dtypes only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# columns per loop iteration: 4096 keeps a few float32 registers per thread at 8 warps
# (not tuned on a GPU yet); smaller values only for tests of the multi-block path
BLOCK_V = 4096


@triton.jit
def _merge_block(x, cols, m, s, best_i, V):
    """Folds one block of float32 logits `x` (columns `cols`, -inf past V) into a row's
    running max `m`, sum of exp(x - m) `s` and first argmax `best_i`."""
    bm = tl.max(x, axis=0)
    bi = tl.min(tl.where(x == bm, cols, V), axis=0)   # first column holding the max
    best_i = tl.where(bm > m, bi, best_i)              # strict: an earlier block keeps it
    m_new = tl.maximum(m, bm)
    s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
    return m_new, s, best_i


@triton.jit
def _target_kernel(t_ptr, max_ptr, log_sum_ptr, top1_ptr, V, stride_t,
                   BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    t_row = t_ptr + row * stride_t
    cols0 = tl.arange(0, BLOCK_V)
    m = float("-inf")
    s = 0.0
    best_i = 0
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + cols0
        t = tl.load(t_row + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m, s, best_i = _merge_block(t, cols, m, s, best_i, V)
    tl.store(max_ptr + row, m)
    tl.store(log_sum_ptr + row, tl.log(s))
    tl.store(top1_ptr + row, best_i.to(tl.int64))


@triton.jit
def _step_kernel(z_ptr, t_ptr, t_max_ptr, t_log_sum_ptr, ce_ptr, top1_ptr, V, stride_z,
                 stride_t, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    t_row = t_ptr + row * stride_t
    t_max = tl.load(t_max_ptr + row)
    t_log_sum = tl.load(t_log_sum_ptr + row)
    cols0 = tl.arange(0, BLOCK_V)
    m = float("-inf")
    s = 0.0
    pz = 0.0
    best_i = 0
    # pass 1: max and sum-exp of z, argmax z, sum p z
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + cols0
        mask = cols < V
        z = tl.load(z_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        t = tl.load(t_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        p = tl.exp((t - t_max) - t_log_sum)                  # 0 past V
        pz += tl.sum(p * tl.where(mask, z, 0.0), axis=0)     # not 0 * -inf past V
        m, s, best_i = _merge_block(z, cols, m, s, best_i, V)
    log_s = tl.log(s)
    tl.store(ce_ptr + row, (m - pz) + log_s)
    tl.store(top1_ptr + row, best_i.to(tl.int64))
    # pass 2: softmax(z) - p over z
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + cols0
        mask = cols < V
        z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.exp((z - m) - log_s) - tl.exp((t - t_max) - t_log_sum)
        tl.store(z_row + cols, g.to(z_ptr.dtype.element_ty), mask=mask)


def _launch_config(vocab: int, block_v: int | None) -> dict:
    block = block_v or min(BLOCK_V, triton.next_power_of_2(vocab))
    return {"BLOCK_V": block, "num_warps": 8 if block >= 2048 else 4}


def _check_logits(name: str, x: torch.Tensor) -> None:
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"{name} must be [n, V] with contiguous rows, got shape "
                         f"{tuple(x.shape)} strides {x.stride()}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"unsupported {name} dtype {x.dtype}")


def soft_ce_target(t: torch.Tensor, block_v: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row max m_t [n] float32, log sum_v exp(t_v - m_t) [n] float32, argmax [n] int64)
    of the target's logits t [n, V]: what `soft_ce_step` needs of the target, once per
    chunk (logsumexp(t) is the sum of the first two), and the target's top-1 (first index
    on ties, as torch.argmax). `block_v` (a power of two) overrides the columns per loop
    iteration (tests)."""
    _check_logits("t", t)
    n, vocab = t.shape
    t_max = torch.empty(n, dtype=torch.float32, device=t.device)
    t_log_sum = torch.empty_like(t_max)
    top1 = torch.empty(n, dtype=torch.int64, device=t.device)
    if n:
        _target_kernel[(n,)](t, t_max, t_log_sum, top1, vocab, t.stride(0),
                             **_launch_config(vocab, block_v))
    return t_max, t_log_sum, top1


def soft_ce_step(z: torch.Tensor, t: torch.Tensor, t_max: torch.Tensor,
                 t_log_sum: torch.Tensor, block_v: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy of each row [n] float32, argmax of each row of z [n] int64) of the
    drafter's logits z [n, V] against the target's distribution softmax(t), and z
    OVERWRITTEN with the gradient of the row's cross-entropy, softmax(z) - softmax(t), in
    z's dtype.

    t [n, V] is in z's dtype, t_max and t_log_sum [n] float32 its row statistics from
    `soft_ce_target`. ce_row = logsumexp(z) - sum_v softmax(t)_v z_v
    = -sum_v softmax(t)_v log softmax(z)_v. Ties in argmax go to the first index
    (torch.argmax's rule). `block_v` as in `soft_ce_target`.
    """
    _check_logits("z", z)
    _check_logits("t", t)
    if t.shape != z.shape or t.dtype != z.dtype:
        raise ValueError(f"t {tuple(t.shape)} {t.dtype} must match z {tuple(z.shape)} "
                         f"{z.dtype}")
    n, vocab = z.shape
    for name, x in (("t_max", t_max), ("t_log_sum", t_log_sum)):
        if x.shape != (n,) or x.dtype != torch.float32:
            raise ValueError(f"{name} {tuple(x.shape)} {x.dtype} must be [{n}] float32")
    ce = torch.empty(n, dtype=torch.float32, device=z.device)
    top1 = torch.empty(n, dtype=torch.int64, device=z.device)
    if n:
        _step_kernel[(n,)](z, t, t_max, t_log_sum, ce, top1, vocab, z.stride(0),
                           t.stride(0), **_launch_config(vocab, block_v))
    return ce, top1
