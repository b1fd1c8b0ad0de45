"""The training loss's parts against plain computations (CPU, tiny tensors)."""

from __future__ import annotations

import pytest
import torch

from coral_vllm.training.losses import chunked_soft_ce, csra_loss, soft_ce_reference

pytestmark = pytest.mark.usefixtures("one_thread")


def test_chunked_soft_ce_matches_plain_loss():
    """Loss (full and top-K terms), gradient, agreement and target top-1 of the chunked
    head loss equal the plain [N, V] computation (float32), with chunks that do not
    divide N."""
    g = torch.Generator().manual_seed(0)
    head = torch.randn(300, 32, generator=g)
    tgt = torch.randn(70, 32, generator=g)
    preds = (tgt + 0.5 * torch.randn(3, 70, 32, generator=g)).requires_grad_(True)
    w = torch.tensor([1.0, 0.5, 0.25])
    w_topk = torch.tensor([0.3, 0.2, 0.1])
    ce, tk, agree, top1 = chunked_soft_ce(preds, tgt, head, chunk=16, topk=10)
    (ce * w + tk * w_topk).sum().backward()
    grad = preds.grad.clone()
    preds.grad = None
    ce_ref, tk_ref, agree_ref, top1_ref = soft_ce_reference(preds, tgt, head, topk=10)
    (ce_ref * w + tk_ref * w_topk).sum().backward()
    assert torch.allclose(ce, ce_ref, rtol=1e-5, atol=1e-6), (ce, ce_ref)
    assert torch.allclose(tk, tk_ref, rtol=1e-5, atol=1e-6), (tk, tk_ref)
    assert torch.allclose(grad, preds.grad, rtol=1e-4, atol=1e-7)
    assert torch.equal(agree, agree_ref) and torch.equal(top1, top1_ref)
    assert 0 < int(agree.sum()) < 3 * 70 and (tk > 0).all() and (tk < ce).all()


def test_csra_zero_when_steps_agree():
    torch.manual_seed(0)
    base = torch.nn.functional.normalize(torch.randn(64, 256), dim=-1)
    same = torch.stack([base, base, base])
    noisy = torch.stack([base, torch.randn(64, 256), torch.randn(64, 256)])
    low, high = csra_loss(same, 0.1), csra_loss(noisy, 0.1)
    assert torch.isfinite(low) and torch.isfinite(high)
    assert low < 0.05 < 1.0 < high
    assert csra_loss(same[:1], 0.1) == 0  # one step: nothing to align
    assert torch.isfinite(csra_loss(noisy, 0.1, max_positions=16))


def test_csra_mean_over_positives_is_the_boolean_index_mean():
    """The loss averages the positive pairs without a boolean index (no count read back
    on a GPU): value and gradient equal the indexed mean's, tokens given or not."""
    torch.manual_seed(0)
    feats = torch.randn(3, 24, 32, requires_grad=True)
    shared = torch.arange(24) % 5
    for tokens in (None, shared):
        got = csra_loss(feats, 0.1, tokens=tokens)
        (g_got,) = torch.autograd.grad(got, feats)
        n, num, _ = feats.shape
        z = torch.nn.functional.normalize(feats, dim=-1).reshape(n * num, -1)
        sim = z @ z.T / 0.1
        pos = torch.arange(num).repeat(n)
        same = pos[:, None] == pos[None, :]
        positive = same & ~torch.eye(n * num, dtype=torch.bool)
        not_neg = same if tokens is None else same | (tokens.repeat(n)[:, None]
                                                      == tokens.repeat(n)[None, :])
        lse = sim.masked_fill(not_neg, float("-inf")).logsumexp(dim=1, keepdim=True)
        want = (torch.logaddexp(sim, lse) - sim)[positive].mean()
        (g_want,) = torch.autograd.grad(want, feats)
        assert torch.allclose(got, want, rtol=1e-6)
        assert torch.allclose(g_got, g_want, rtol=1e-5, atol=1e-8)


def test_csra_other_token_negatives():
    """Positions that share a target token are not each other's negatives: all-distinct
    tokens change nothing, a shared token lowers the loss (fewer negatives), and a query
    left with no negative costs 0 with a finite gradient."""
    torch.manual_seed(0)
    feats = torch.randn(3, 32, 64, requires_grad=True)
    plain = csra_loss(feats, 0.1)
    assert torch.allclose(csra_loss(feats, 0.1, tokens=torch.arange(32)), plain)
    shared = torch.arange(32) % 4
    assert csra_loss(feats, 0.1, tokens=shared) < plain
    sub = csra_loss(feats, 0.1, max_positions=8, tokens=shared,
                    generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(sub)
    alone = csra_loss(feats, 0.1, tokens=torch.zeros(32, dtype=torch.long))
    alone.backward()
    assert alone == 0 and torch.isfinite(feats.grad).all()


def test_soft_ce_setting_is_checked_and_reaches_the_loss(monkeypatch):
    """`--soft-ce` names the loss path (the fallback if a card's kernel check fails): a
    bad value fails naming the setting; compute_loss passes it to chunked_soft_ce."""
    from types import SimpleNamespace

    from coral_vllm.training import losses
    from coral_vllm.training.config import TrainConfig

    with pytest.raises(ValueError, match="soft_ce='cuda'"):
        TrainConfig(soft_ce="cuda")
    seen = []
    real = losses.chunked_soft_ce
    monkeypatch.setattr(losses, "chunked_soft_ce",
                        lambda *a, **kw: seen.append(kw["impl"]) or real(*a, **kw))
    d, vocab = 8, 32
    drafter = SimpleNamespace(lm_head=torch.nn.Linear(d, vocab, bias=False))
    outs = [torch.randn(1, 5, d) for _ in range(2)]
    loss, stats = losses.compute_loss(outs, torch.randn(1, 5, d), torch.arange(5), drafter,
                                      None, TrainConfig(soft_ce="torch", csra_weight=0.0))
    assert seen == ["torch"] and torch.isfinite(loss) and "ce" in stats
