"""Where a speculative decoding step spends its time: the draft phase (vLLM's proposer,
k drafter steps) against the rest (target forward, rejection sampling, scheduling).

Inside the engine's worker (collective_rpc) the proposer's `propose` is wrapped twice:

1. timed: synchronize, propose, synchronize. Gives the draft phase's wall time per
   engine step, hence its share of the step and c = T_draft / T_target step directly
   (the synchronization costs a little pipelining, so absolute step times rise a bit);
2. profiled: a `record_function` range under the torch profiler, no extra syncs. Gives
   per draft phase the kernels launched (and which), CUDA-graph launches, host<->device
   copies and synchronizations, and GPU busy time vs host time.

Batch 1, greedy, one request at a time: the latency case the speedup target is about.

    coral-vllm bench profile --drafters eagle=DIR coral=DIR -k 3
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from coral_vllm.bench.args import add_drafters_arg, bench_parser, target_dir
from coral_vllm.bench.results import write_json
from coral_vllm.named_paths import parse_drafters
from coral_vllm.runtime.device import device_name
from coral_vllm.speculative_config import METHOD, NUM_SPECULATIVE_TOKENS, speculative_config

RANGE = "coral_bench::propose"
_SYNC_OPS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def _proposer(worker: Any) -> Any:
    runner = worker.model_runner
    return getattr(runner, "speculator", None) or runner.drafter  # MRV2 (GPU) / V1 (CPU)


def _unwrap_propose(prop: Any) -> None:
    del prop.propose  # the instance attribute goes; the class's method shows again


def install_timer(worker: Any) -> None:
    """Wraps propose: wall time of each call between two synchronizations."""
    import torch

    prop = _proposer(worker)
    prop.coral_times = []
    inner = prop.propose
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def timed(*a, **kw):
        sync()
        t0 = time.perf_counter()
        out = inner(*a, **kw)
        sync()
        prop.coral_times.append(time.perf_counter() - t0)
        return out

    prop.propose = timed


def collect_times(worker: Any) -> list[float]:
    prop = _proposer(worker)
    _unwrap_propose(prop)
    return prop.coral_times


def start_profile(worker: Any) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    prop = _proposer(worker)
    inner = prop.propose

    def ranged(*a, **kw):
        with record_function(RANGE):
            return inner(*a, **kw)

    prop.propose = ranged
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available()
                                     else [])
    prop.coral_prof = profile(activities=acts)
    prop.coral_prof.__enter__()


def stop_profile(worker: Any) -> dict[str, Any]:
    """Summary computed in the worker (plain data crosses the RPC boundary)."""
    prop = _proposer(worker)
    prop.coral_prof.__exit__(None, None, None)
    _unwrap_propose(prop)
    events = prop.coral_prof.events()
    ranges = sorted((e.time_range.start, e.time_range.end) for e in events if e.name == RANGE)

    def in_draft(t: float) -> bool:
        return any(a <= t <= b for a, b in ranges)

    runtime: dict[str, dict[str, float]] = {}
    kernels: dict[str, dict[str, float]] = {}
    for e in events:
        if e.device_type.name == "CUDA":  # a kernel or copy on the GPU
            continue
        name = e.name
        if name.startswith("cuda") or name.startswith("cu"):
            side = "draft" if in_draft(e.time_range.start) else "other"
            s = runtime.setdefault(f"{side}:{name}", {"count": 0, "host_us": 0.0})
            s["count"] += 1
            s["host_us"] += e.cpu_time_total
        for k in e.kernels:  # device work launched by this host op
            side = "draft" if in_draft(e.time_range.start) else "other"
            s = kernels.setdefault(f"{side}:{k.name}", {"count": 0, "gpu_us": 0.0})
            s["count"] += 1
            s["gpu_us"] += k.duration
    n = max(len(ranges), 1)
    draft_host_us = sum(b - a for a, b in ranges)

    def total(d, side, key):
        return sum(v[key] for k, v in d.items() if k.startswith(side + ":"))

    def per_call(d, side, key, top=12):
        items = sorted(((k.split(":", 1)[1], v) for k, v in d.items()
                        if k.startswith(side + ":")), key=lambda kv: -kv[1][key])
        return [{"name": k[:120], "per_draft_phase": round(v["count"] / n, 2),
                 key: round(v[key] / n, 2)} for k, v in items[:top]]

    syncs = {s: runtime.get(f"draft:{s}", {}).get("count", 0) / n for s in _SYNC_OPS}
    return {
        "draft_phases_profiled": len(ranges),
        "draft_phase_host_us": round(draft_host_us / n, 1),
        "draft_phase_gpu_kernel_us": round(total(kernels, "draft", "gpu_us") / n, 1),
        "draft_phase_kernels": round(total(kernels, "draft", "count") / n, 1),
        "other_gpu_kernel_us_per_step": round(total(kernels, "other", "gpu_us") / n, 1),
        "draft_phase_syncs": syncs,
        "draft_runtime_calls": per_call(runtime, "draft", "count"),
        "draft_top_kernels": per_call(kernels, "draft", "gpu_us"),
        "other_top_kernels": per_call(kernels, "other", "gpu_us", top=8),
    }


def profile_variant(model: Path, drafter: Path, k: int, prompts: list[list[int]],
                    max_tokens: int) -> dict[str, Any]:
    from vllm import SamplingParams, TokensPrompt

    from coral_vllm.format.checkpoint import is_coral_checkpoint
    from coral_vllm.runtime.metrics import from_llm_metrics
    from coral_vllm.runtime.offline_engine import offline_engine

    spec = speculative_config(drafter, k,
                              method=METHOD if is_coral_checkpoint(drafter) else "eagle")
    params = SamplingParams(temperature=0, max_tokens=max_tokens)

    def one_by_one(llm) -> float:
        t0 = time.perf_counter()
        for p in prompts:
            llm.generate([TokensPrompt(prompt_token_ids=p)], params, use_tqdm=False)
        return time.perf_counter() - t0

    out: dict[str, Any] = {"method": spec["method"]}
    with offline_engine(model, spec, max_model_len=2048, disable_log_stats=False) as llm:
        one_by_one(llm)  # warm-up
        before = from_llm_metrics(llm.get_metrics())
        wall = one_by_one(llm)
        stats = from_llm_metrics(llm.get_metrics()) - before
        steps = stats.num_drafts  # one draft phase per engine step at batch 1
        out["untimed"] = {"wall_s": round(wall, 3), "engine_steps": int(steps),
                          "step_ms": round(1000 * wall / max(steps, 1), 3),
                          "acceptance_length": round(stats.acceptance_length, 3)}
        llm.collective_rpc(install_timer)
        wall = one_by_one(llm)
        times = llm.collective_rpc(collect_times)[0]
        draft_ms = 1000 * sum(times) / len(times)
        step_ms = 1000 * wall / len(times)
        out["timed"] = {"draft_phases": len(times), "draft_phase_ms": round(draft_ms, 3),
                        "step_ms": round(step_ms, 3),
                        "draft_share_of_step": round(draft_ms / step_ms, 3),
                        "c": round(draft_ms / k / (step_ms - draft_ms), 3)}
        llm.collective_rpc(start_profile)
        llm.generate([TokensPrompt(prompt_token_ids=prompts[0])], params, use_tqdm=False)
        out["profile"] = llm.collective_rpc(stop_profile)[0]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser("profile", __doc__)
    add_drafters_arg(ap)
    ap.add_argument("-k", type=int, default=NUM_SPECULATIVE_TOKENS)
    ap.add_argument("--prompts", type=int, default=4, help="MT-bench prompts, one at a time")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--out", default="benchmarks/results/draft_step_profile.json")
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc(fn)

    import vllm
    from transformers import AutoTokenizer

    from coral_vllm.data.eval_sets import benchmark_prompts

    drafters = parse_drafters(args.drafters)
    model = target_dir(args)
    prompts = benchmark_prompts("mtbench", AutoTokenizer.from_pretrained(str(model)),
                                args.prompts)
    result: dict[str, Any] = {
        "device": device_name(), "vllm_version": vllm.__version__, "model": model.name,
        "k": args.k, "batch_size": 1, "temperature": 0.0, "max_tokens": args.max_tokens,
        "prompts": f"first {args.prompts} MT-bench first turns, one request at a time",
        "c": "timed draft phase / k / (step - draft phase), from synchronized timing",
        "profiler_limits": "kernels replayed inside CUDA graphs are not attributed to a "
                           "launch by the torch profiler: kernel lists and GPU times cover "
                           "eagerly launched work only; cudaGraphLaunch counts the replays",
        "drafters": {}}
    for name, path in drafters.items():
        result["drafters"][name] = profile_variant(model, path, args.k, prompts,
                                                   args.max_tokens)
        write_json(Path(args.out), result)
        r = result["drafters"][name]
        print(f"{name}: step {r['timed']['step_ms']} ms, draft phase "
              f"{r['timed']['draft_phase_ms']} ms ({r['timed']['draft_share_of_step']:.0%}),"
              f" c={r['timed']['c']}; kernels/draft phase "
              f"{r['profile']['draft_phase_kernels']}, GPU {r['profile']['draft_phase_gpu_kernel_us']}"
              f" us vs host {r['profile']['draft_phase_host_us']} us", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
