"""Which machine this runs on: a CUDA card, or the CPU (vLLM's CPU backend, in float32)."""

from __future__ import annotations

import platform


def on_cpu() -> bool:
    """No CUDA device (or no torch): vLLM runs its CPU backend."""
    try:
        import torch
    except ImportError:
        return True
    return not torch.cuda.is_available()


def device_name() -> str:
    """The GPU's name, or the CPU (where the engines run in float32): what results and
    training runs record they were measured on."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.machine()}), float32"
