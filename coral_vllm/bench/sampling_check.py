"""Sampling losslessness check (T=1): does speculative decoding keep the target's
distribution? Offline `vllm.LLM`, one prompt, many 3-token samples per variant:

  plain (twice, for the noise yardstick) and plain at T=0.7 (to show the check has power),
  coral with greedy drafting, coral with probabilistic drafting (the rejection test then
  uses the restricted grouped distribution), and vLLM's stock EAGLE (same drafter weights,
  dense head) as the upstream reference.

Each variant passes if its binned total variation to plain is within twice the
plain-vs-plain value (see coral_vllm/bench/lossless.py). Writes sampling_check.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coral_vllm.bench.results import device_name  # noqa: E402
from coral_vllm.format.checkpoint import write_eagle_checkpoint  # noqa: E402
from coral_vllm.models.drafters import default_drafter  # noqa: E402
from coral_vllm.bench.lossless import binned_tv, noise_bound, token_marginals  # noqa: E402
from coral_vllm.models.model_store import fetch_model  # noqa: E402
from coral_vllm.runtime.offline_engine import offline_engine  # noqa: E402

PROMPT = "Name a colour."


def sample(model: Path, spec: dict | None, temperatures: list[float], n: int,
           on_gpu: bool) -> list[list[list[int]]]:
    from vllm import SamplingParams

    kw = dict(enforce_eager=True, gpu_memory_utilization=0.5) if on_gpu else {}
    with offline_engine(model, spec, max_model_len=512, **kw) as llm:
        out = []
        for t in temperatures:
            res = llm.chat([[{"role": "user", "content": PROMPT}]] * n,
                           SamplingParams(temperature=t, max_tokens=3), use_tqdm=False)
            out.append([list(r.outputs[0].token_ids) for r in res])
        return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", help="convert the default target from this local GGUF")
    ap.add_argument("--drafter", help="CORAL drafter dir (default: the shipped one)")
    ap.add_argument("-k", type=int, default=3)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)

    import torch
    import vllm

    on_gpu = torch.cuda.is_available()
    model = fetch_model(gguf=args.gguf)
    drafter = Path(args.drafter) if args.drafter else default_drafter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stock = write_eagle_checkpoint(drafter, out / "stock-eagle-drafter")
    coral = {"method": "coral", "model": str(drafter), "num_speculative_tokens": args.k}
    a, b, t07 = sample(model, None, [1.0, 1.0, 0.7], args.samples, on_gpu)
    ref = token_marginals(a)
    bound = noise_bound(ref, token_marginals(b))
    variants = {
        "plain_T0.7 (must FAIL: power check)": t07,
        "coral_greedy_draft": sample(model, coral, [1.0], args.samples, on_gpu)[0],
        "coral_probabilistic_draft": sample(
            model, {**coral, "draft_sample_method": "probabilistic"}, [1.0], args.samples,
            on_gpu)[0],
        "stock_eagle_greedy_draft": sample(
            model, {"method": "eagle", "model": str(stock), "num_speculative_tokens": args.k},
            [1.0], args.samples, on_gpu)[0],
    }
    rows = {name: {"tv": binned_tv(token_marginals(s), ref),
                   "within_noise": binned_tv(token_marginals(s), ref) <= bound}
            for name, s in variants.items()}
    result = {"device": device_name(),
              "vllm_version": vllm.__version__, "model": str(model), "drafter": str(drafter),
              "k": args.k, "temperature": 1.0, "prompt": PROMPT, "samples": args.samples,
              "statistic": "binned TV over first 3 positions (coral_vllm/bench/lossless.py)",
              "plain_vs_plain_tv": binned_tv(token_marginals(b), ref), "bound": bound,
              "variants": rows}
    (out / "sampling_check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['device']} vLLM {vllm.__version__}: plain-vs-plain "
          f"{result['plain_vs_plain_tv']:.3f}, bound {bound:.3f}")
    for name, r in rows.items():
        print(f"  {name:40s} TV {r['tv']:.3f}  {'within noise' if r['within_noise'] else 'SHIFTED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
