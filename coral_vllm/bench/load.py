"""Load test: can a coral server take traffic? Many concurrent streaming chat requests
of mixed lengths, some hung up mid-stream, for a fixed time, on loopback only.

It starts `vllm serve` twice (plain and coral, at once), asks the plain server once for
every greedy request of the pool (the reference), then keeps `--concurrency` streaming
chat requests in flight against the coral server for `--duration-s` seconds: prompts
from MT-bench, HumanEval and GSM8K, `--max-tokens` mixed, a `--sampled-fraction` at
T=0.8 (so greedy requests share batches with sampled ones), and a `--cancel-fraction`
closed by the client after a few chunks. Then it stops by itself. It records

- failed: errors, or replies that did not end with `stop` / `length`;
- mismatched: greedy replies read to the end whose text differs from plain decoding's;
- cancelled, time to first token (client side), and the coral server's resident memory
  (its process tree) after `--warmup-s` and at the end;
- the server's own view afterwards: requests still running or waiting (a hung-up
  stream the engine never aborted shows up there) and the spec-decode counters.

    coral-vllm bench load --out benchmarks/results/load.json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import sys
import time
from pathlib import Path
from typing import Any

from coral_vllm.bench.args import (add_enforce_eager_arg, add_engine_resource_args,
                                   add_output_args, bench_parser, engine_resources,
                                   server_log_dir, target_dir)
from coral_vllm.bench.client import openai_client, run_load
from coral_vllm.bench.results import write_json
from coral_vllm.data.eval_sets import BENCHMARKS, benchmark_texts
from coral_vllm.named_paths import PLAIN
from coral_vllm.runtime.device import device_name
from coral_vllm.runtime.metrics import parse_prometheus, prometheus_totals
from coral_vllm.runtime.server import (RunningServer, ServerSpec, fetch_metrics,
                                       running_server_processes)
from coral_vllm.speculative_config import NUM_SPECULATIVE_TOKENS

SAMPLED_TEMPERATURE = 0.8
CANCEL_AFTER_CHUNKS = (1, 12)  # a cancelled stream hangs up after this many chunks
RSS_EVERY_S = 1.0


@dataclasses.dataclass(frozen=True)
class Template:
    """One distinct request of the pool; the load sends each many times."""

    prompt: str
    max_tokens: int
    temperature: float


@dataclasses.dataclass
class Outcome:
    template: Template
    text: str = ""
    ttft_s: float | None = None
    finish_reason: str | None = None
    cancelled: bool = False
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None or (
            not self.cancelled and self.finish_reason not in ("stop", "length"))


def request_pool(n: int, max_tokens: list[int], sampled_fraction: float,
                 rng: random.Random) -> list[Template]:
    """`n` requests: prompts taken in turn from each benchmark (their lengths differ),
    output budgets cycled through `max_tokens`, a share sampled at T=0.8."""
    texts = [benchmark_texts(name) for name in BENCHMARKS]
    prompts = [texts[i % len(texts)][i // len(texts)] for i in range(n)]
    sampled = set(rng.sample(range(n), round(n * sampled_fraction)))
    return [Template(p, max_tokens[i % len(max_tokens)],
                     SAMPLED_TEMPERATURE if i in sampled else 0.0)
            for i, p in enumerate(prompts)]


def plain_replies(url: str, pool: list[Template], concurrency: int) -> dict[Template, str]:
    """The reference: plain decoding's reply to every greedy request of the pool."""
    greedy = [t for t in pool if t.temperature == 0]
    out: dict[Template, str] = {}
    for budget in sorted({t.max_tokens for t in greedy}):
        group = [t for t in greedy if t.max_tokens == budget]
        load = run_load(url, [t.prompt for t in group], concurrency=concurrency,
                        max_tokens=budget, temperature=0.0)
        out.update(zip(group, load.replies))
    return out


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (the API server and its
    engine processes), MiB."""
    import psutil

    root = psutil.Process(pid)
    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


async def _stream_one(client: Any, model: str, t: Template,
                      cancel_after: int | None) -> Outcome:
    out = Outcome(t)
    t0 = time.perf_counter()
    try:
        stream = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": t.prompt}],
            max_tokens=t.max_tokens, temperature=t.temperature, stream=True)
        chunks: list[str] = []
        async for chunk in stream:
            if not chunk.choices:
                continue
            choice = chunk.choices[0]
            if choice.delta.content:
                if out.ttft_s is None:
                    out.ttft_s = time.perf_counter() - t0
                chunks.append(choice.delta.content)
            out.finish_reason = choice.finish_reason or out.finish_reason
            if cancel_after is not None and len(chunks) >= cancel_after \
                    and out.finish_reason is None:
                out.cancelled = True
                await stream.close()
                break
        out.text = "".join(chunks)
    except Exception as e:  # noqa: BLE001 - every failure is counted, none stops the load
        out.error = error_chain(e)
    return out


def error_chain(e: BaseException) -> str:
    """`Type: message` of an exception and of each cause below it: the OpenAI client's
    `APIConnectionError: Connection error.` says nothing until its httpx cause is named."""
    parts = []
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        parts.append(f"{type(cur).__name__}: {cur}")
        cur = cur.__cause__ or cur.__context__
    return " <- ".join(parts)


async def _drive(server: RunningServer, pool: list[Template], *, concurrency: int,
                 duration_s: float, warmup_s: float, cancel_fraction: float,
                 rng: random.Random) -> tuple[list[Outcome], list[tuple[float, float]]]:
    """Keeps `concurrency` streams in flight until `duration_s` has passed (those in
    flight then finish), sampling the server's memory meanwhile."""
    outcomes: list[Outcome] = []
    rss: list[tuple[float, float]] = []
    t_start = time.monotonic()
    deadline = t_start + duration_s
    async with openai_client(server.url, concurrency, timeout_s=600) as client:
        model = (await client.models.list()).data[0].id

        async def user() -> None:
            while time.monotonic() < deadline:
                cancel = rng.random() < cancel_fraction
                outcomes.append(await _stream_one(
                    client, model, rng.choice(pool),
                    rng.randint(*CANCEL_AFTER_CHUNKS) if cancel else None))

        async def sample_memory() -> None:
            while time.monotonic() < deadline:
                rss.append((time.monotonic() - t_start, tree_rss_mb(server.pid)))
                await asyncio.sleep(RSS_EVERY_S)

        await asyncio.gather(sample_memory(), *(user() for _ in range(concurrency)))
    rss.append((time.monotonic() - t_start, tree_rss_mb(server.pid)))
    return outcomes, [r for r in rss if r[0] >= warmup_s] or rss[-1:]


def _percentile_ms(values: list[float], q: float) -> float | None:
    import numpy as np

    return round(1000 * float(np.percentile(values, q)), 1) if values else None


def summarize(outcomes: list[Outcome], reference: dict[Template, str]) -> dict[str, Any]:
    """The counts the issue asks for, plus a few examples of whatever went wrong."""
    compared = [o for o in outcomes if o.template in reference
                and not o.cancelled and not o.failed]
    mismatched = [o for o in compared if o.text != reference[o.template]]
    ttft = [o.ttft_s for o in outcomes if o.ttft_s is not None]
    return {
        "requests": len(outcomes),
        "failed": sum(o.failed for o in outcomes),
        "mismatched": len(mismatched),
        "cancelled": sum(o.cancelled for o in outcomes),
        "compared": len(compared),
        "p50_ttft_ms": _percentile_ms(ttft, 50),
        "p99_ttft_ms": _percentile_ms(ttft, 99),
        "failures": [{"error": o.error, "finish_reason": o.finish_reason}
                     for o in outcomes if o.failed][:5],
        "mismatches": [{"prompt": o.template.prompt[:200], "max_tokens": o.template.max_tokens,
                        "plain": reference[o.template], "coral": o.text}
                       for o in mismatched][:3],
    }


def _settled_counts(url: str, timeout_s: float = 30.0) -> dict[str, float]:
    """Requests the server still runs or queues once the load is over (0 unless a
    hung-up stream leaked), waiting up to `timeout_s` for aborts to land."""
    deadline = time.monotonic() + timeout_s
    while True:
        totals = prometheus_totals(fetch_metrics(url))
        counts = {k: totals.get(f"vllm:num_requests_{k}", 0.0) for k in ("running", "waiting")}
        if not any(counts.values()) or time.monotonic() > deadline:
            return counts
        time.sleep(1.0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import vllm

    from coral_vllm.model_store.drafters import default_drafter

    model = target_dir(args)
    drafter = Path(args.drafter) if args.drafter else default_drafter()
    out = Path(args.out)
    log_dir = server_log_dir(args)
    rng = random.Random(args.seed)
    pool = request_pool(args.prompts, args.max_tokens, args.sampled_fraction, rng)
    extra = ["--disable-uvicorn-access-log", "--max-num-seqs", str(args.concurrency)]
    if args.enforce_eager:
        extra.append("--enforce-eager")
    gpu_engine = {**engine_resources(args), **({"dtype": args.gpu_dtype} if args.gpu_dtype
                                               else {})}
    specs = {name: ServerSpec(model, d, args.k, None, extra, log_dir / f"load_{name}.log",
                              gpu_engine)
             for name, d in ((PLAIN, None), ("coral", drafter))}
    print(f"starting plain and coral servers (logs in {log_dir})", flush=True)
    with running_server_processes(specs, startup_timeout=args.startup_timeout) as servers:
        reference = plain_replies(servers[PLAIN].url, pool, min(args.concurrency, 16))
        coral = servers["coral"]
        before = parse_prometheus(fetch_metrics(coral.url))
        print(f"{len(reference)} plain references; {args.concurrency} streams for "
              f"{args.duration_s:g}s", flush=True)
        t0 = time.perf_counter()
        outcomes, rss = asyncio.run(_drive(
            coral, pool, concurrency=args.concurrency, duration_s=args.duration_s,
            warmup_s=args.warmup_s if args.warmup_s is not None else args.duration_s / 4,
            cancel_fraction=args.cancel_fraction, rng=rng))
        duration = time.perf_counter() - t0
        settled = _settled_counts(coral.url)
        spec = parse_prometheus(fetch_metrics(coral.url)) - before
    result = {"device": device_name(), **summarize(outcomes, reference),
              "concurrency": args.concurrency, "duration_s": round(duration, 1),
              "rss_mb_start": round(rss[0][1], 1), "rss_mb_end": round(rss[-1][1], 1)}
    failures, mismatches = result.pop("failures"), result.pop("mismatches")
    result.update({
        "vllm_version": vllm.__version__, "model": model.name, "drafter": str(drafter),
        "k": args.k, "enforce_eager": args.enforce_eager, "gpu_dtype": args.gpu_dtype,
        "pool": {"requests": len(pool), "greedy": len(reference),
                              "max_tokens": args.max_tokens,
                              "sampled_temperature": SAMPLED_TEMPERATURE,
                              "prompts": f"benchmark_texts of {', '.join(BENCHMARKS)}, in turn"},
        "cancel_fraction": args.cancel_fraction, "ttft": "client side, first content chunk",
        "client": "openai AsyncOpenAI, streaming, a fresh connection per request, no retries",
        "rss": "coral server process tree; start = first sample after warm-up",
        "rss_mb_series": [[round(t, 1), round(mb, 1)] for t, mb in rss[::10]],
        "server_after": settled, "spec_decode": spec.to_dict(),
        "failures": failures, "mismatches": mismatches})
    write_json(out, result)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser("load", __doc__)
    p.add_argument("--drafter", help="CORAL drafter dir (default: the shipped one)")
    p.add_argument("-k", type=int, default=NUM_SPECULATIVE_TOKENS,
                   help=f"draft tokens per step (default {NUM_SPECULATIVE_TOKENS})")
    p.add_argument("--duration-s", type=float, default=180.0,
                   help="seconds of load; requests in flight then finish (default 180)")
    p.add_argument("--warmup-s", type=float,
                   help="memory is compared from this second on (default: duration / 4)")
    p.add_argument("--concurrency", type=int, default=64,
                   help="streaming requests in flight (default 64)")
    p.add_argument("--cancel-fraction", type=float, default=0.2,
                   help="share of requests the client hangs up mid-stream (default 0.2)")
    p.add_argument("--sampled-fraction", type=float, default=0.25,
                   help=f"share of the pool sampled at T={SAMPLED_TEMPERATURE} (default 0.25)")
    p.add_argument("--prompts", type=int, default=48, help="distinct requests (default 48)")
    p.add_argument("--max-tokens", type=int, nargs="+", default=[16, 48, 128, 256],
                   help="output budgets, cycled over the pool (default 16 48 128 256)")
    p.add_argument("--seed", type=int, default=0, help="client-side choices (default 0)")
    add_enforce_eager_arg(p)
    p.add_argument("--gpu-dtype", help="GPU only: serve in this dtype (default bfloat16; "
                   "float32 makes T=0 replies independent of batching up to near-ties)")
    add_engine_resource_args(p, gpu_memory_utilization=0.2, kv_cache_gib=8,
                             per="server (GPU only)")
    add_output_args(p, "benchmarks/results/load.json")
    return p


def main(argv: list[str] | None = None) -> int:
    r = run(build_parser().parse_args(argv))
    print(f"{r['device']}: {r['requests']} requests at concurrency {r['concurrency']} in "
          f"{r['duration_s']}s: failed {r['failed']}, mismatched {r['mismatched']} of "
          f"{r['compared']} compared, cancelled {r['cancelled']}; TTFT p50 "
          f"{r['p50_ttft_ms']} ms, p99 {r['p99_ttft_ms']} ms; RSS {r['rss_mb_start']} -> "
          f"{r['rss_mb_end']} MiB; server after: {r['server_after']}")
    return 0 if r["failed"] == 0 and r["mismatched"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
