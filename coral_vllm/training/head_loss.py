"""Soft cross-entropy through the frozen LM head, chunked so no [N, V] tensor is kept.

The drafter's distillation term at HASS step j is

    ce_j = mean_n  -sum_v p_t[n, v] * log_softmax(o_j[n] @ W^T)[v],   p_t = softmax(f[n] @ W^T)

over N response positions, with the target's next-token distribution p_t recomputed from
its feature f (the head W is frozen). Built plainly, this holds several [N, V] float32
tensors per step (N ~ 20k positions x V = 49k is 4 GB each), which made the loss the
largest cost of a training step and rules out 128k-262k vocabularies. Here rows are
processed in chunks of `chunk` positions: per chunk the target's probabilities and each
step's logits exist once, the loss, the top-1 agreement and the gradient with respect to
o_j (softmax(o_j W^T) - p_t) @ W / N are computed on the spot, and only the [N, d]
gradients are kept for backward (the idea of Liger-Kernel's fused linear losses). All
steps share one pass over the target's logits.

With `topk` the same pass also gives HASS's top-K distillation term (the target's K most
probable tokens only) and its gradient. `soft_ce_reference` is the plain version the
chunked one is tested against.
"""

from __future__ import annotations

import torch

# float32 elements of one [chunk, V] logits tensor (a few of them are alive at once)
CHUNK_ELEMENTS = 1 << 26


def default_chunk(vocab_size: int) -> int:
    """Rows per chunk so one [chunk, V] float32 tensor stays near 256 MiB."""
    return max(64, CHUNK_ELEMENTS // vocab_size)


def soft_ce_reference(preds: torch.Tensor, target_feats: torch.Tensor, head: torch.Tensor,
                      topk: int = 0) -> tuple[torch.Tensor, ...]:
    """Plain version: (ce [S] mean per step, top-K ce [S], top-1 agreement count [S],
    target top-1 [N]).

    preds [S, N, d] (S drafting steps), target_feats [N, d], head [V, d]; logits in
    float32 from float32 operands. The top-K term (HASS's second phase) is
    -sum over the target's K most probable tokens of p_target * log q (0 if topk = 0).
    """
    with torch.no_grad():
        t_logits = target_feats.float() @ head.float().T
        t_probs, t_top1 = t_logits.softmax(-1), t_logits.argmax(-1)
    d_logits = preds.float() @ head.float().T                       # [S, N, V]
    logq = d_logits.log_softmax(-1)
    ce = -(t_probs * logq).sum(-1).mean(-1)
    topk_ce = torch.zeros_like(ce)
    if topk:
        pk, ik = t_probs.topk(topk, dim=-1)
        topk_ce = -(pk * logq.gather(-1, ik.expand(len(preds), -1, -1))).sum(-1).mean(-1)
    agree = (d_logits.argmax(-1) == t_top1).sum(-1)
    return ce, topk_ce, agree, t_top1


class _ChunkedSoftCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, preds: torch.Tensor, target_feats: torch.Tensor, head: torch.Tensor,
                chunk: int, topk: int) -> tuple[torch.Tensor, ...]:
        steps, n, _ = preds.shape
        ce = torch.zeros(steps, dtype=torch.float32, device=preds.device)
        topk_ce = torch.zeros_like(ce)
        agree = torch.zeros(steps, dtype=torch.int64, device=preds.device)
        top1 = torch.empty(n, dtype=torch.int64, device=preds.device)
        grad = torch.empty_like(preds)
        grad_topk = torch.empty_like(preds) if topk else grad.new_zeros(())
        w = head.to(preds.dtype)
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            t_logits = (target_feats[a:b].to(w.dtype) @ w.T).float()
            t_probs = t_logits.softmax(-1)
            top1[a:b] = t_logits.argmax(-1)
            del t_logits
            if topk:
                pk, ik = t_probs.topk(topk, dim=-1)
                mass = pk.sum(-1, keepdim=True)
            for s in range(steps):
                d_logits = (preds[s, a:b] @ w.T).float()
                lse = d_logits.logsumexp(-1, keepdim=True)
                # -sum p log softmax(z) = lse - sum p z   (p sums to one)
                ce[s] += (lse.squeeze(-1) - (t_probs * d_logits).sum(-1)).sum()
                if topk:
                    topk_ce[s] += (mass * lse).sum() - (pk * d_logits.gather(1, ik)).sum()
                agree[s] += (d_logits.argmax(-1) == top1[a:b]).sum()
                soft = d_logits.sub_(lse).exp_()                    # softmax(z), in place
                if topk:  # d/dz of the top-K term: mass * softmax(z) - p on the K tokens
                    g = (soft * mass).scatter_add_(1, ik, -pk)
                    grad_topk[s, a:b] = (g.to(w.dtype) @ w).to(grad.dtype)
                    del g
                soft.sub_(t_probs)                                  # softmax(z) - p
                grad[s, a:b] = (soft.to(w.dtype) @ w).to(grad.dtype)
                del d_logits, lse, soft
        ce /= max(1, n)
        topk_ce /= max(1, n)
        grad /= max(1, n)
        if topk:
            grad_topk /= max(1, n)
        ctx.save_for_backward(grad, grad_topk)
        ctx.topk = topk
        ctx.mark_non_differentiable(agree, top1)
        return ce, topk_ce, agree, top1

    @staticmethod
    def backward(ctx, grad_ce: torch.Tensor, grad_tk: torch.Tensor, *_unused):
        grad, grad_topk = ctx.saved_tensors
        out = grad * grad_ce.to(grad.dtype).view(-1, 1, 1)
        if ctx.topk:
            out = out + grad_topk * grad_tk.to(grad.dtype).view(-1, 1, 1)
        return out, None, None, None, None


def chunked_soft_ce(preds: torch.Tensor, target_feats: torch.Tensor, head: torch.Tensor,
                    chunk: int | None = None, topk: int = 0) -> tuple[torch.Tensor, ...]:
    """Same outputs as `soft_ce_reference`, differentiable in `preds` only.

    The matrix products run in `preds`' dtype (bf16 under autocast on a GPU; float32 on
    the CPU, where it matches the reference to float32 rounding); softmax, log-sum-exp
    and the loss in float32. Nothing here reads a value back to the host.
    """
    if preds.dim() != 3 or preds.shape[1:] != target_feats.shape:
        raise ValueError(f"preds {tuple(preds.shape)} must be [steps, N, d] with "
                         f"target_feats {tuple(target_feats.shape)} = [N, d]")
    return _ChunkedSoftCE.apply(preds, target_feats, head.detach(),
                                chunk or default_chunk(head.shape[0]), topk)
