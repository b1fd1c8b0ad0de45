"""Serving check: the same prompts through `vllm serve` without and with the coral method.

One request at a time (batch 1), greedy, through the OpenAI client. Reports per variant
the output tokens/s, how many replies are identical to plain decoding's, and (coral) the
spec-decode counters from /metrics. On the CPU (float32) identical replies are expected;
in bf16 on a GPU, verifying k+1 tokens at once may legitimately flip a near-tie.

    coral-vllm bench serve-check --out benchmarks/results/serve_check.json
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from coral_vllm.bench.args import add_output_args, bench_parser, server_log_dir, target_dir
from coral_vllm.bench.results import write_json
from coral_vllm.bench.smoke_prompts import SMOKE_PROMPTS
from coral_vllm.format.checkpoint import read_checkpoint
from coral_vllm.model_store.drafters import default_drafter
from coral_vllm.named_paths import PLAIN
from coral_vllm.runtime.device import device_name
from coral_vllm.runtime.metrics import parse_prometheus
from coral_vllm.runtime.server import fetch_metrics, running_server
from coral_vllm.speculative_config import NUM_SPECULATIVE_TOKENS


def run_variant(model: Path, drafter: Path | None, k: int, prompts: list[str],
                max_tokens: int, log: Path) -> dict:
    from openai import OpenAI

    t_start = time.perf_counter()
    with running_server(model, drafter, num_speculative_tokens=k, log_path=log) as url:
        startup_s = time.perf_counter() - t_start
        client = OpenAI(base_url=url + "/v1", api_key="EMPTY")
        served = client.models.list().data[0].id
        ask = lambda p: client.chat.completions.create(  # noqa: E731
            model=served, messages=[{"role": "user", "content": p}],
            max_tokens=max_tokens, temperature=0)
        ask(prompts[0])  # warm-up, not timed
        before = parse_prometheus(fetch_metrics(url))
        replies, tokens, elapsed = [], 0, 0.0
        for p in prompts:
            t0 = time.perf_counter()
            r = ask(p)
            elapsed += time.perf_counter() - t0
            replies.append(r.choices[0].message.content)
            tokens += r.usage.completion_tokens
        stats = parse_prometheus(fetch_metrics(url)) - before
    return {"startup_s": round(startup_s, 1), "output_tokens": tokens,
            "output_tok_s": tokens / elapsed, "tpot_ms": 1000 * elapsed / tokens,
            "replies": replies, "spec_decode": stats.to_dict() if drafter else None}


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser("serve-check", __doc__)
    ap.add_argument("--drafter", help="CORAL drafter dir (default: the shipped one)")
    ap.add_argument("-k", "--num-speculative-tokens", type=int, default=NUM_SPECULATIVE_TOKENS)
    ap.add_argument("--max-tokens", type=int, default=128)
    add_output_args(ap, "benchmarks/results/serve_check.json")
    args = ap.parse_args(argv)

    import vllm

    model = target_dir(args)
    drafter = Path(args.drafter) if args.drafter else default_drafter()
    out = Path(args.out)
    log_dir = server_log_dir(args)
    trained = read_checkpoint(drafter).coral.trained
    rows = {}
    for name, d in ((PLAIN, None), ("coral", drafter)):
        print(f"== {name}", flush=True)
        rows[name] = run_variant(model, d, args.num_speculative_tokens, SMOKE_PROMPTS,
                                 args.max_tokens, log_dir / f"serve_check_{name}.log")
    same = sum(a == b for a, b in zip(rows[PLAIN]["replies"], rows["coral"]["replies"]))
    result = {
        "device": device_name(), "vllm_version": vllm.__version__, "model": str(model),
        "drafter": str(drafter), "drafter_trained": trained,
        "k": args.num_speculative_tokens, "batch_size": 1, "temperature": 0.0,
        "prompts": "coral_vllm.bench.smoke_prompts.SMOKE_PROMPTS (8 chat prompts)",
        "max_tokens": args.max_tokens, "acceptance": "real (the drafter's own drafts)",
        "identical_replies": f"{same}/{len(SMOKE_PROMPTS)}",
        "variants": rows,
    }
    write_json(out, result)
    c = rows["coral"]["spec_decode"]
    print(f"device {result['device']}, vLLM {vllm.__version__}, k={args.num_speculative_tokens}, "
          f"drafter {'trained' if trained else 'UNTRAINED'}")
    for name, r in rows.items():
        print(f"  {name:6s} {r['output_tok_s']:8.1f} tok/s  tpot {r['tpot_ms']:.2f} ms  "
              f"start {r['startup_s']}s")
    print(f"  identical replies {same}/{len(SMOKE_PROMPTS)}; acceptance length "
          f"{c['acceptance_length']:.2f}, per position "
          + ", ".join(f"{x:.2f}" for x in c["accepted_per_position"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
