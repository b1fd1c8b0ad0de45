"""The drafter's training loss: feature regression, distillation through the frozen head,
CORAL's cross-step alignment (CSRA) and the online router's cross-entropy.

    loss = sum_j w^(j-1) * [a * SmoothL1(o_j, f_{+1}) + b * ce_j + c * topk_ce_j]
           + csra_weight * InfoNCE(o_1 .. o_n across steps)
           + CE(router(o_j.detach()), group of the target's top-1)     (router, online)

over the response positions of a batch, o_j being HASS step j's output feature and f_{+1}
the target's next feature (w = step_weight_decay, a = feature_loss_weight,
b = distill_weight, c = topk_weight; `TrainConfig`).

**Distillation** (`chunked_soft_ce`): at step j

    ce_j = mean_n  -sum_v p_t[n, v] * log_softmax(o_j[n] @ W^T)[v],   p_t = softmax(f[n] @ W^T)

with the target's next-token distribution p_t recomputed from its feature f (the head W
is frozen). Built plainly, this holds several [N, V] float32 tensors per step (N ~ 20k
positions x V = 49k is 4 GB each), which made the loss the largest cost of a training
step and rules out 128k-262k vocabularies. Here rows are processed in chunks of `chunk`
positions: per chunk the target's probabilities and each step's logits exist once, the
loss, the top-1 agreement and the gradient with respect to o_j
(softmax(o_j W^T) - p_t) @ W / N are computed on the spot, and only the [N, d] gradients
are kept for backward (the idea of Liger-Kernel's fused linear losses). All steps share
one pass over the target's logits. With `topk` the same pass also gives HASS's top-K
distillation term (the target's K most probable tokens only) and its gradient.
`soft_ce_reference` is the plain version the chunked one is tested against.

Per chunk the softmax work on the logits is float32 torch ops (`_chunk_torch`), about ten
memory-bound passes over each [chunk, V] tensor: on an H200 most of a training step's
GPU time (docs/training.md). On CUDA without a top-K term it goes through the Triton
kernels of `coral_vllm.kernels.soft_ce` instead (`_chunk_triton`: each step reads its
logits and the target's twice, in their own dtype, and writes the gradient over its
logits); the torch path stays as their reference (`soft_ce_impl` picks, `impl=` forces
one).

**CSRA** (`csra_loss`): the drafter's output features for one position at different
steps should agree (they predict the same next feature) and differ from other
positions'. The paper leaves temperature, weight, pair choice and negatives open; the
choices here are settings in TrainConfig (`csra_*`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from coral_vllm.head.router import Router, top_groups
from coral_vllm.training.config import SOFT_CE_IMPLS, TrainConfig
from coral_vllm.training.model import CoralDrafter


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


def soft_ce_impl(preds: torch.Tensor, topk: int, impl: str = "auto") -> str:
    """Which path `chunked_soft_ce` takes: "auto" is the Triton kernels
    (`coral_vllm.kernels.soft_ce`) for CUDA tensors without a top-K term, the torch path
    otherwise (HASS's top-K term has no kernel). "triton" forces the kernels (on the CPU
    they need TRITON_INTERPRET=1: tests), "torch" the reference path."""
    if impl not in SOFT_CE_IMPLS:
        raise ValueError(f"impl {impl!r} is not one of {SOFT_CE_IMPLS}")
    if impl == "auto":
        return "triton" if preds.is_cuda and not topk else "torch"
    if impl == "triton" and topk:
        raise ValueError("the soft_ce kernels have no top-K term: impl='triton' needs "
                         "topk=0")
    return impl


@dataclass
class _Outputs:
    """What the chunk loops fill: per step (ce, topk_ce, agree) sums over rows, the
    target's top-1 per row, and the gradients with respect to preds (not yet / N)."""
    ce: torch.Tensor
    topk_ce: torch.Tensor
    agree: torch.Tensor
    top1: torch.Tensor
    grad: torch.Tensor
    grad_topk: torch.Tensor


def _chunk_torch(out: _Outputs, rows: slice, preds: torch.Tensor, target_feats: torch.Tensor,
                 w: torch.Tensor, topk: int) -> None:
    """One chunk of rows, every step, in float32 torch ops (the reference path)."""
    t_logits = (target_feats[rows].to(w.dtype) @ w.T).float()
    t_probs = t_logits.softmax(-1)
    top1 = out.top1[rows] = t_logits.argmax(-1)
    del t_logits
    if topk:
        pk, ik = t_probs.topk(topk, dim=-1)
        mass = pk.sum(-1, keepdim=True)
    for s in range(len(preds)):
        d_logits = (preds[s, rows] @ w.T).float()
        lse = d_logits.logsumexp(-1, keepdim=True)
        # -sum p log softmax(z) = lse - sum p z   (p sums to one)
        out.ce[s] += (lse.squeeze(-1) - (t_probs * d_logits).sum(-1)).sum()
        if topk:
            out.topk_ce[s] += (mass * lse).sum() - (pk * d_logits.gather(1, ik)).sum()
        out.agree[s] += (d_logits.argmax(-1) == top1).sum()
        soft = d_logits.sub_(lse).exp_()                    # softmax(z), in place
        if topk:  # d/dz of the top-K term: mass * softmax(z) - p on the K tokens
            g = (soft * mass).scatter_add_(1, ik, -pk)
            out.grad_topk[s, rows] = (g.to(w.dtype) @ w).to(out.grad.dtype)
            del g
        soft.sub_(t_probs)                                  # softmax(z) - p
        out.grad[s, rows] = (soft.to(w.dtype) @ w).to(out.grad.dtype)
        del d_logits, lse, soft


def _chunk_triton(out: _Outputs, rows: slice, preds: torch.Tensor,
                  target_feats: torch.Tensor, w: torch.Tensor) -> None:
    """One chunk of rows, every step, through the soft_ce kernels: the logits stay in
    w's dtype and each step reads its own and the target's twice (no top-K term)."""
    from coral_vllm.kernels.soft_ce import soft_ce_step, soft_ce_target

    t_logits = target_feats[rows].to(w.dtype) @ w.T
    t_max, t_log_sum, top1 = soft_ce_target(t_logits)
    out.top1[rows] = top1
    for s in range(len(preds)):
        z = preds[s, rows] @ w.T
        ce_rows, z_top1 = soft_ce_step(z, t_logits, t_max, t_log_sum)  # z := softmax(z) - p
        out.ce[s] += ce_rows.sum()
        out.agree[s] += (z_top1 == top1).sum()
        out.grad[s, rows] = (z @ w).to(out.grad.dtype)
        del z


class _ChunkedSoftCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, preds: torch.Tensor, target_feats: torch.Tensor, head: torch.Tensor,
                chunk: int, topk: int, impl: str) -> tuple[torch.Tensor, ...]:
        steps, n, _ = preds.shape
        ce = torch.zeros(steps, dtype=torch.float32, device=preds.device)
        out = _Outputs(ce=ce, topk_ce=torch.zeros_like(ce),
                       agree=torch.zeros(steps, dtype=torch.int64, device=preds.device),
                       top1=torch.empty(n, dtype=torch.int64, device=preds.device),
                       grad=torch.empty_like(preds),
                       grad_topk=torch.empty_like(preds) if topk else preds.new_zeros(()))
        w = head.to(preds.dtype)
        for a in range(0, n, chunk):
            rows = slice(a, min(n, a + chunk))
            if impl == "triton":
                _chunk_triton(out, rows, preds, target_feats, w)
            else:
                _chunk_torch(out, rows, preds, target_feats, w, topk)
        for total in (out.ce, out.topk_ce, out.grad, out.grad_topk):
            total /= max(1, n)
        ctx.save_for_backward(out.grad, out.grad_topk)
        ctx.topk = topk
        ctx.mark_non_differentiable(out.agree, out.top1)
        return out.ce, out.topk_ce, out.agree, out.top1

    @staticmethod
    def backward(ctx, grad_ce: torch.Tensor, grad_tk: torch.Tensor, *_unused):
        grad, grad_topk = ctx.saved_tensors
        out = grad * grad_ce.to(grad.dtype).view(-1, 1, 1)
        if ctx.topk:
            out = out + grad_topk * grad_tk.to(grad.dtype).view(-1, 1, 1)
        return out, None, None, None, None, None


def chunked_soft_ce(preds: torch.Tensor, target_feats: torch.Tensor, head: torch.Tensor,
                    chunk: int | None = None, topk: int = 0, impl: str = "auto"
                    ) -> tuple[torch.Tensor, ...]:
    """Same outputs as `soft_ce_reference`, differentiable in `preds` only.

    The matrix products run in `preds`' dtype (bf16 under autocast on a GPU; float32 on
    the CPU, where it matches the reference to float32 rounding); softmax, log-sum-exp
    and the loss in float32. `impl` picks the path (`soft_ce_impl`): on CUDA without a
    top-K term the Triton kernels do the softmax work on the logits in their own dtype,
    else float32 torch ops. Nothing here reads a value back to the host.
    """
    if preds.dim() != 3 or preds.shape[1:] != target_feats.shape:
        raise ValueError(f"preds {tuple(preds.shape)} must be [steps, N, d] with "
                         f"target_feats {tuple(target_feats.shape)} = [N, d]")
    return _ChunkedSoftCE.apply(preds, target_feats, head.detach(),
                                chunk or default_chunk(head.shape[0]), topk,
                                soft_ce_impl(preds, topk, impl))


def csra_loss(features: torch.Tensor, temperature: float = 0.1,
              max_positions: int | None = None,
              generator: torch.Generator | None = None,
              tokens: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE over the drafter's output features across steps.

    `features` [n_steps, N, d]: output of step j at position p. For a query (i, p) each
    (j, p) with j != i is a positive; every (j', p') with p' != p is a negative, except,
    when `tokens` [N] is given, positions whose token equals p's: two positions that
    predict the same next token (the target's top-1) should have similar features, so
    pushing them apart fights the distillation term ("other-token" negatives).
    Per (query, positive) pair:
        -log( exp(s(q, f+)/T) / (exp(s(q, f+)/T) + sum_neg exp(s(q, f-)/T)) ),
    s = cosine similarity; averaged over all pairs. Zero when steps agree and other
    positions are far; 0 (no signal) with a single step. At most `max_positions`
    positions are sampled, bounding the (n N)^2 similarity matrix.
    """
    n, num, _ = features.shape
    if n < 2 or num < 2:
        return features.sum() * 0.0
    if max_positions and num > max_positions:
        idx = torch.randperm(num, generator=generator, device="cpu")[:max_positions]
        if features.is_cuda:  # from pinned memory, not waited for: a pageable copy syncs
            idx = idx.pin_memory().to(features.device, non_blocking=True)
        features = features[:, idx]
        tokens = None if tokens is None else tokens[idx]
        num = max_positions
    z = F.normalize(features.float(), dim=-1).reshape(n * num, -1)
    sim = (z @ z.T) / temperature                               # [nN, nN]
    pos_id = torch.arange(num, device=z.device).repeat(n)       # position of each row
    same_pos = pos_id[:, None] == pos_id[None, :]
    eye = torch.eye(n * num, dtype=torch.bool, device=z.device)
    positive = same_pos & ~eye
    not_negative = same_pos
    if tokens is not None:
        tok = tokens.repeat(n)
        not_negative = same_pos | (tok[:, None] == tok[None, :])
    # log-sum-exp over the negatives of each query (-inf where a query has none left:
    # its pairs then cost 0), then combine with each positive
    neg_lse = sim.masked_fill(not_negative, float("-inf")).logsumexp(dim=1, keepdim=True)
    pair = torch.logaddexp(sim, neg_lse) - sim                  # -log softmax of the pair
    # the mean over the positive pairs, each of the n * num queries having n - 1; a
    # boolean index would read its count back to the host (a sync per step)
    return pair.masked_fill(~positive, 0.0).sum() / (n * num * (n - 1))


def feature_loss(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[steps] SmoothL1 between each step's output features [steps, N, d] and the target's
    next features [N, d] (EAGLE's regression term), in float32."""
    return F.smooth_l1_loss(preds.float(), target.float().expand_as(preds),
                            reduction="none").mean(dim=(1, 2))


def router_loss(router: Router, preds: torch.Tensor, label: torch.Tensor, k: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy to the group of the target's top-1, recall@k) of the router over
    the detached output features of every step: it learns from the drafter without
    changing it. `label` [N] is each position's group, the same at every step."""
    logits = router(preds.detach().flatten(0, 1).to(router.w1.weight.dtype))
    label = label.repeat(len(preds))
    loss = F.cross_entropy(logits.float(), label)
    chosen = top_groups(logits, k)  # the online router pins nothing
    return loss, (chosen == label[:, None]).any(-1).double().mean()


def compute_loss(outs: list[torch.Tensor], feat_tgt: torch.Tensor, loss_pos: torch.Tensor,
                 drafter: CoralDrafter, group_of: torch.Tensor | None, cfg: TrainConfig,
                 generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss, stats as device tensors) over the response positions `loss_pos` of the
    flattened [B, S-1] batch; `group_of` (token -> group) trains the router when set.
    A batch without response positions gives a zero loss (every rank must still run
    backward under DDP) and no statistics."""
    if loss_pos.numel() == 0:  # the shape is known on the host: no sync
        touched = sum(o.sum() for o in outs) + sum(p.sum() for p in drafter.router.parameters())
        return touched * 0.0, {}
    preds = torch.stack([o.flatten(0, 1)[loss_pos] for o in outs])       # [steps, N, d]
    tgt = feat_tgt.flatten(0, 1)[loss_pos]                               # [N, d]
    steps, n = preds.shape[:2]
    feat = feature_loss(preds, tgt)
    topk = cfg.topk_distill if cfg.topk_weight > 0 else 0
    ce, topk_ce, agree, top1 = chunked_soft_ce(preds, tgt, drafter.lm_head.weight, topk=topk,
                                               impl=cfg.soft_ce)
    weights = cfg.step_weight_decay ** torch.arange(steps, device=preds.device)
    per_step = (cfg.feature_loss_weight * feat + cfg.distill_weight * ce
                + cfg.topk_weight * topk_ce)
    loss = (weights * per_step).sum()
    stats = {"feat": feat.detach(), "ce": ce.detach(), "acc": agree.double() / max(1, n)}
    if topk:
        stats["topk_ce"] = topk_ce.detach()
    if cfg.csra_weight > 0 and steps > 1:
        c = csra_loss(preds, cfg.csra_temperature, cfg.csra_max_positions, generator,
                      tokens=top1 if cfg.csra_negatives == "other-token" else None)
        loss = loss + cfg.csra_weight * c
        stats["csra"] = c.detach()
    if group_of is not None:
        r_loss, recall = router_loss(drafter.router, preds, group_of[top1], cfg.top_k_groups)
        loss = loss + r_loss
        stats["router_loss"], stats["router_recall"] = r_loss.detach(), recall
    stats["loss"] = loss.detach()
    return loss, stats
