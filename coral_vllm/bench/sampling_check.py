"""Sampling losslessness check (T=1): does speculative decoding keep the target's
distribution? Offline `vllm.LLM`, one prompt, many 3-token samples per variant:

  plain (twice, for the noise yardstick) and plain at T=0.7 (to show the check has power),
  coral with greedy drafting, coral with probabilistic drafting (the rejection test then
  uses the restricted grouped distribution), and vLLM's stock EAGLE (same drafter weights,
  dense head) as the upstream reference.

Each variant passes if its binned total variation to plain is within twice the
plain-vs-plain value (see coral_vllm/bench/lossless.py).

    coral-vllm bench sampling-check --out benchmarks/results/sampling_check.json
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from coral_vllm.bench.args import bench_parser, target_dir
from coral_vllm.bench.lossless import binned_tv, noise_bound, token_marginals
from coral_vllm.bench.results import write_json
from coral_vllm.format.checkpoint import write_eagle_checkpoint
from coral_vllm.model_store.drafters import default_drafter
from coral_vllm.runtime.device import device_name
from coral_vllm.runtime.offline_engine import offline_engine
from coral_vllm.speculative_config import NUM_SPECULATIVE_TOKENS, speculative_config

PROMPT = "Name a colour."
# eager: many short engines, where start-up dominates and speed does not matter
GPU_ENGINE = {"enforce_eager": True, "gpu_memory_utilization": 0.5}


def sample(model: Path, spec: dict | None, temperatures: list[float],
           n: int) -> list[list[list[int]]]:
    from vllm import SamplingParams

    with offline_engine(model, spec, gpu_only=GPU_ENGINE, max_model_len=512) as llm:
        out = []
        for t in temperatures:
            res = llm.chat([[{"role": "user", "content": PROMPT}]] * n,
                           SamplingParams(temperature=t, max_tokens=3), use_tqdm=False)
            out.append([list(r.outputs[0].token_ids) for r in res])
        return out


def run(model: Path, drafter: Path, stock_dir: Path, k: int, samples: int) -> dict:
    """Every variant's samples against plain decoding's; `stock_dir` receives the
    drafter as a stock EAGLE checkpoint (the upstream reference)."""
    stock = write_eagle_checkpoint(drafter, stock_dir)
    coral = speculative_config(drafter, k)
    a, b, t07 = sample(model, None, [1.0, 1.0, 0.7], samples)
    ref = token_marginals(a)
    bound = noise_bound(ref, token_marginals(b))
    variants = {
        "plain_T0.7 (must FAIL: power check)": t07,
        "coral_greedy_draft": sample(model, coral, [1.0], samples)[0],
        "coral_probabilistic_draft": sample(
            model, {**coral, "draft_sample_method": "probabilistic"}, [1.0], samples)[0],
        "stock_eagle_greedy_draft": sample(
            model, speculative_config(stock, k, method="eagle"), [1.0], samples)[0],
    }
    rows = {name: {"tv": binned_tv(token_marginals(s), ref),
                   "within_noise": binned_tv(token_marginals(s), ref) <= bound}
            for name, s in variants.items()}
    return {"model": str(model), "drafter": str(drafter), "k": k, "temperature": 1.0,
            "prompt": PROMPT, "samples": samples,
            "statistic": "binned TV over first 3 positions (coral_vllm/bench/lossless.py)",
            "plain_vs_plain_tv": binned_tv(token_marginals(b), ref), "bound": bound,
            "variants": rows}


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser("sampling-check", __doc__)
    ap.add_argument("--drafter", help="CORAL drafter dir (default: the shipped one)")
    ap.add_argument("-k", type=int, default=NUM_SPECULATIVE_TOKENS)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--out", default="benchmarks/results/sampling_check.json")
    args = ap.parse_args(argv)

    import vllm

    model = target_dir(args)
    drafter = Path(args.drafter) if args.drafter else default_drafter()
    with tempfile.TemporaryDirectory(prefix="coral-stock-eagle-") as tmp:
        result = run(model, drafter, Path(tmp) / "stock-eagle", args.k, args.samples)
    result = {"device": device_name(), "vllm_version": vllm.__version__, **result}
    write_json(Path(args.out), result)
    print(f"{result['device']} vLLM {vllm.__version__}: plain-vs-plain "
          f"{result['plain_vs_plain_tv']:.3f}, bound {result['bound']:.3f}")
    for name, r in result["variants"].items():
        verdict = "within noise" if r["within_noise"] else "SHIFTED"
        print(f"  {name:40s} TV {r['tv']:.3f}  {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
