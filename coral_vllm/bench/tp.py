"""Tensor parallelism: coral at TP=t against plain decoding at TP=t, one engine at a time.

Greedy replies of both on the smoke prompts (identical expected: verification is by the
target), output tokens/s at each batch size, and what every rank's sharded grouped head
holds (rows, sub-group slots) and drafts for a fixed set of features (every rank must
return the same tokens).

    coral-vllm bench tp --tensor-parallel-size 2 --out benchmarks/results/tp2.json

The default target is Gemma-3-270M (4 attention heads, with its drafter): SmolLM2-135M
has 9 attention heads, which no tensor parallel size > 1 divides.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from coral_vllm.bench.args import add_enforce_eager_arg, bench_parser
from coral_vllm.bench.results import write_json
from coral_vllm.bench.smoke_prompts import SMOKE_PROMPTS
from coral_vllm.named_paths import PLAIN
from coral_vllm.runtime.device import device_name
from coral_vllm.speculative_config import NUM_SPECULATIVE_TOKENS, speculative_config

DEFAULT_TP_MODEL = "gemma3-270m"
PROBE_SEED = 0
PROBE_TOKENS = 8


def probe_features(hidden_size: int):
    """The fixed drafter features every rank is asked to draft from."""
    import torch

    return torch.randn(PROBE_TOKENS, hidden_size, generator=torch.Generator().manual_seed(
        PROBE_SEED))


def _rank_head(worker, features: list) -> dict[str, Any]:
    """Runs in every vLLM worker: this rank's sharded head and its drafts for `features`
    (greedy tokens; the restricted distribution's support size and log-partition)."""
    import torch

    model = worker.model_runner.drafter.model
    weight = model.lm_head.weight
    h = torch.tensor(features, dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        top = model.get_top_tokens(h)
        logits = model.compute_logits(h).float()
    head = model.tp_head
    return {"rows": None if head is None else head.weight.shape[0],
            "slots_per_group": None if head is None else head.sub_of_group.shape[1],
            "rows_per_slot": None if head is None else head.sub_size,
            "top_tokens": top.cpu().tolist(),
            "support": torch.isfinite(logits).sum(-1).cpu().tolist(),
            "logsumexp": torch.logsumexp(logits, -1).cpu().tolist()}


def _generate(llm, prompts: list[str], batch: int, max_tokens: int):
    """Greedy replies and output tok/s, `batch` prompts per generate call."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    replies, tokens, elapsed = [], 0, 0.0
    for i in range(0, len(prompts), batch):
        t0 = time.perf_counter()
        outs = llm.generate(prompts[i:i + batch], params, use_tqdm=False)
        elapsed += time.perf_counter() - t0
        for o in outs:
            replies.append(list(o.outputs[0].token_ids))
            tokens += len(o.outputs[0].token_ids)
    return replies, tokens / elapsed


def run_variant(model: Path, spec: dict | None, tp: int, batches: list[int],
                max_tokens: int, dtype: str, hidden_size: int,
                enforce_eager: bool = False) -> dict[str, Any]:
    from coral_vllm.runtime.engine_args import bind_cpu_ranks
    from coral_vllm.runtime.metrics import from_llm_metrics
    from coral_vllm.runtime.offline_engine import offline_engine

    bind_cpu_ranks(tp)
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc(fn)
    out: dict[str, Any] = {"replies": {}, "tok_s": {}}
    with offline_engine(model, spec, tensor_parallel_size=tp, dtype=dtype,
                        disable_log_stats=False, max_model_len=1024,
                        enforce_eager=enforce_eager) as llm:
        _generate(llm, SMOKE_PROMPTS[:1], 1, 8)  # warm-up, not timed
        for batch in batches:
            prompts = (SMOKE_PROMPTS * (-(-batch // len(SMOKE_PROMPTS))))[:max(batch, 8)]
            out["replies"][batch], out["tok_s"][batch] = _generate(llm, prompts, batch,
                                                                   max_tokens)
        if spec is not None:
            out["spec_decode"] = from_llm_metrics(llm.get_metrics()).to_dict()
            out["ranks"] = llm.collective_rpc(
                _rank_head, args=(probe_features(hidden_size).tolist(),))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser("tp", __doc__)
    ap.add_argument("--drafter", help="CORAL drafter dir (default: the target's default)")
    ap.add_argument("--tensor-parallel-size", "-t", type=int, default=2)
    ap.add_argument("-k", "--num-speculative-tokens", type=int, default=NUM_SPECULATIVE_TOKENS)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="float32",
                    help="float32 (default) keeps T=0 replies independent of batching, so "
                         "identity is a strict test; bfloat16 for serving speed")
    add_enforce_eager_arg(ap)
    ap.add_argument("--out", default="benchmarks/results/tp2.json")
    args = ap.parse_args(argv)

    import json

    import vllm

    from coral_vllm.model_store.drafters import default_drafter
    from coral_vllm.model_store.targets import fetch_model

    model = Path(args.model) if args.model else fetch_model(DEFAULT_TP_MODEL, gguf=args.gguf)
    drafter = Path(args.drafter) if args.drafter else default_drafter(DEFAULT_TP_MODEL)
    hidden = json.loads((drafter / "config.json").read_text())["hidden_size"]
    spec = speculative_config(drafter, args.num_speculative_tokens)
    t = args.tensor_parallel_size
    runs = {}
    for name, s in ((PLAIN, None), ("coral", spec)):
        print(f"== {name}, tensor_parallel_size {t}", flush=True)
        runs[name] = run_variant(model, s, t, args.batches, args.max_tokens, args.dtype,
                                 hidden, args.enforce_eager)
    pairs = [(a, b) for batch in args.batches
             for a, b in zip(runs[PLAIN]["replies"][batch], runs["coral"]["replies"][batch])]
    same = sum(a == b for a, b in pairs)
    ranks = runs["coral"]["ranks"]
    result = {
        "device": device_name(), "tensor_parallel_size": t,
        "prompts": f"coral_vllm.bench.smoke_prompts.SMOKE_PROMPTS ({len(SMOKE_PROMPTS)}, "
                   "as plain text, repeated to fill a batch)",
        "identical": same == len(pairs), "identical_replies": f"{same}/{len(pairs)}",
        "rows": [{"variant": name, "batch": b, "output_tok_s": runs[name]["tok_s"][b]}
                 for name in runs for b in args.batches],
        "vllm_version": vllm.__version__, "model": str(model), "drafter": str(drafter),
        "dtype": args.dtype, "k": args.num_speculative_tokens, "max_tokens": args.max_tokens,
        "enforce_eager": args.enforce_eager,
        "spec_decode": runs["coral"]["spec_decode"],
        "ranks_agree": all(r["top_tokens"] == ranks[0]["top_tokens"] for r in ranks),
        "ranks": ranks,
    }
    write_json(Path(args.out), result)
    print(f"device {result['device']}, TP={t}: identical replies {same}/{len(pairs)}, "
          f"ranks agree: {result['ranks_agree']}")
    for row in result["rows"]:
        print(f"  {row['variant']:6s} batch {row['batch']:3d} {row['output_tok_s']:9.1f} tok/s")
    return 0 if result["identical"] and result["ranks_agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
