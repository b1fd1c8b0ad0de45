"""The soft_ce Triton kernels (CPU: TRITON_INTERPRET=1) against float64 math on the same
logits, and the chunked loss through them against its torch path and the plain
reference: loss, gradient, top-1 agreement and the target's top-1, float32 (tight) and
bfloat16 (loose), with argmax ties and very peaked rows."""

from __future__ import annotations


import pytest
import torch

try:
    import triton  # noqa: F401
except Exception as exc:  # pragma: no cover - depends on the environment
    pytest.skip(f"triton not importable: {exc}", allow_module_level=True)

from coral_vllm.kernels.soft_ce import soft_ce_step, soft_ce_target  # noqa: E402
from coral_vllm.training.losses import (chunked_soft_ce, soft_ce_impl,  # noqa: E402
                                        soft_ce_reference)

pytestmark = pytest.mark.usefixtures("one_thread")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16]
# (ce, gradient) tolerance of the kernels against float64 math on the same logits: the
# gradient is stored in the logits' dtype
TOL = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (1e-5, 4e-3)}


def exact(z: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """float64 lse_t, target top-1, per-row ce, drafter argmax, softmax(z) - p."""
    z, t = z.double(), t.double()
    p = t.softmax(-1)
    return {"lse_t": t.logsumexp(-1), "top1_t": t.argmax(-1),
            "ce": z.logsumexp(-1) - (p * z).sum(-1), "top1_z": z.argmax(-1),
            "grad": z.softmax(-1) - p}


def run_kernels(z: torch.Tensor, t: torch.Tensor, block_v: int | None
                ) -> dict[str, torch.Tensor]:
    t_max, t_log_sum, top1_t = soft_ce_target(t, block_v)
    grad = z.clone()
    ce, top1_z = soft_ce_step(grad, t, t_max, t_log_sum, block_v)
    return {"lse_t": t_max + t_log_sum, "top1_t": top1_t, "ce": ce, "top1_z": top1_z,
            "grad": grad}


def check_kernels(z: torch.Tensor, t: torch.Tensor, block_v: int | None = None) -> None:
    got = run_kernels(z.to(DEVICE), t.to(DEVICE), block_v)
    ref = exact(z, t)
    tol_ce, tol_grad = TOL[z.dtype]
    for key in ("top1_t", "top1_z"):
        assert torch.equal(got[key].cpu(), ref[key]), key
    assert got["grad"].dtype == z.dtype
    for key, tol in (("lse_t", tol_ce), ("ce", tol_ce), ("grad", tol_grad)):
        g = got[key].cpu().double()
        assert torch.isfinite(g).all(), key
        scale = ref[key].abs().max().clamp(min=1.0)
        err = (g - ref[key]).abs().max()
        assert err <= tol * scale, \
            f"{key}: max |err| {float(err):.3g} > {tol} * {float(scale):.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("n,vocab,block_v", [(1, 1000, None), (7, 4099, None),
                                             (7, 1000, 256), (64, 4099, None)])
def test_kernels_match_exact_math(n, vocab, block_v, dtype):
    """lse, argmax (both sides), per-row ce and softmax(z) - p for random rows; vocabularies
    that are not a multiple of the block, one block or several (block_v=256)."""
    g = torch.Generator().manual_seed(n * vocab)
    t = (3 * torch.randn(n, vocab, generator=g)).to(dtype)
    z = (t.float() + 2 * torch.randn(n, vocab, generator=g)).to(dtype)
    check_kernels(z, t, block_v)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
def test_argmax_ties_take_the_first_index(dtype):
    """Equal maxima within a block, across blocks and in the ragged last block: the first
    index wins in both kernels, as in torch.argmax."""
    vocab, block = 1000, 256
    g = torch.Generator().manual_seed(1)
    t = torch.randn(4, vocab, generator=g).to(dtype)
    z = torch.randn(4, vocab, generator=g).to(dtype)
    for x in (t, z):
        x[0, [10, 20]] = 9.0          # same block
        x[1, [300, 700]] = 9.0        # different blocks
        x[2, [780, 999]] = 9.0        # later block, then the ragged last one
        x[3, [5, 6]] = 9.0
        x[3, 800] = 9.5               # a strictly larger later maximum beats the ties
    check_kernels(z, t, block)
    top1 = soft_ce_target(t.to(DEVICE), block)[2]
    assert top1.cpu().tolist() == [10, 300, 780, 800]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
def test_peaked_rows_stay_finite(dtype):
    """Rows with logits in the thousands (one token far above the rest, or two): no
    overflow, no NaN; the loss of a row whose drafter agrees with a one-hot target is ~0."""
    vocab = 4099
    g = torch.Generator().manual_seed(2)
    t = torch.randn(3, vocab, generator=g)
    t[0, 17] = 3000.0
    t[1, [5, 4000]] = 2000.0
    t[2] *= 500.0
    z = torch.randn(3, vocab, generator=g)
    z[0, 17] = 3000.0
    z[1, 4000] = -3000.0
    z[2] *= 400.0
    check_kernels(z.to(dtype), t.to(dtype))
    t = t.to(DEVICE, dtype)
    ce, _ = soft_ce_step(z.to(DEVICE, dtype), t, *soft_ce_target(t)[:2])
    assert abs(float(ce[0])) < 1e-3


def chunked(preds, tgt, head, impl, chunk, weights):
    """Outputs of chunked_soft_ce through `impl` and the gradient of sum(weights * ce)."""
    preds = preds.detach().clone().requires_grad_(True)
    ce, tk, agree, top1 = chunked_soft_ce(preds, tgt, head, chunk=chunk, impl=impl)
    (ce * weights).sum().backward()
    return ce.detach(), tk, agree, top1, preds.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[-1])
@pytest.mark.parametrize("n,vocab", [(1, 1000), (7, 4099), (64, 1000)])
def test_chunked_loss_through_the_kernels(n, vocab, dtype):
    """chunked_soft_ce with impl='triton' equals its torch path (same logits: float32
    rounding apart; in bf16 the gradient is rounded to bf16 on both) and, in float32, the
    plain reference; in bf16 the reference (float32 logits) is close. Chunks of 16 rows:
    several chunks, the last one ragged. Three steps of different quality."""
    g = torch.Generator().manual_seed(n + vocab)
    d = 32
    head = torch.randn(vocab, d, generator=g)
    tgt = torch.randn(n, d, generator=g)
    noise = torch.tensor([0.1, 1.0, 3.0]).view(3, 1, 1)
    preds = tgt + noise * torch.randn(3, n, d, generator=g)
    weights = torch.tensor([1.0, 0.5, 0.25])
    dev = lambda x: x.to(device=DEVICE, dtype=dtype)  # noqa: E731
    args = (dev(preds), dev(tgt), dev(head))
    ce, tk, agree, top1, grad = chunked(*args, "triton", 16, weights.to(DEVICE))
    ce_t, tk_t, agree_t, top1_t, grad_t = chunked(*args, "torch", 16, weights.to(DEVICE))
    assert grad.dtype == dtype and torch.equal(tk, tk_t) and not tk.any()
    assert torch.equal(top1, top1_t) and torch.equal(agree, agree_t) and agree[0] > 0
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (1e-4, 1e-3)
    assert torch.allclose(ce, ce_t, rtol=rtol, atol=atol), (ce, ce_t)
    if dtype == torch.float32:
        assert torch.allclose(grad, grad_t, rtol=1e-4, atol=1e-6)
    else:   # softmax(z) - p differs in the last float32 bits: a bf16 ulp here and there
        err = (grad.float() - grad_t.float()).abs().max()
        assert err <= 0.02 * grad_t.float().abs().max(), err

    p = preds.clone().requires_grad_(True)
    ce_r, _, agree_r, top1_r = soft_ce_reference(p, tgt, head)
    (ce_r * weights).sum().backward()
    if dtype == torch.float32:
        assert torch.allclose(ce.cpu(), ce_r, rtol=1e-5, atol=1e-6), (ce, ce_r)
        assert torch.allclose(grad.cpu(), p.grad, rtol=1e-4, atol=1e-6)
        assert torch.equal(agree.cpu(), agree_r) and torch.equal(top1.cpu(), top1_r)
    else:   # bf16 operands: the logits themselves differ from the float32 reference's
        # (the torch path is off by as much: 2-4% of the gradient's norm here)
        assert torch.allclose(ce.cpu(), ce_r, rtol=3e-2, atol=0.1), (ce, ce_r)
        assert (grad.cpu().float() - p.grad).norm() <= 0.08 * p.grad.norm()


def test_impl_choice():
    """'auto' takes the kernels only for CUDA tensors without a top-K term; forcing them
    with a top-K term, or naming no known path, is an error."""
    cpu = torch.zeros(1, 1, 1)
    assert soft_ce_impl(cpu, topk=0) == "torch" and soft_ce_impl(cpu, 0, "triton") == "triton"
    with pytest.raises(ValueError, match="topk=0"):
        soft_ce_impl(cpu, topk=4, impl="triton")
    with pytest.raises(ValueError, match="not one of"):
        soft_ce_impl(cpu, topk=0, impl="cuda")
    if torch.cuda.is_available():
        gpu = cpu.cuda()
        assert soft_ce_impl(gpu, 0) == "triton" and soft_ce_impl(gpu, 4) == "torch"
