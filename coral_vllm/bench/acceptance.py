"""Mean acceptance length tau per drafter, measured by vLLM itself: chain drafting with k
tokens, greedy (T=0), the target verifying, on the first turns of MT-bench and HumanEval
(`--datasets`: GSM8K too).

tau = 1 + accepted / drafts from vLLM's spec-decode counters (the bonus token counted),
one offline engine per drafter, all drafters on the same prompts and settings. Dense
drafters (EAGLE/HASS baselines) are exported with every group active.

Each row also has `tau_by_k`: tau had the engine drafted only j <= k tokens, from the
same run's per-position counters, 1 + (the share of drafts whose first i tokens were all
accepted, summed over i <= j). In a chain the first j drafts of a step do not depend on
the later ones, so this is the k-token run cut at j; a run drafting j tokens would start
its steps at other positions of the same (greedy, lossless) text, so the two agree in
expectation, not to the digit. One engine per drafter instead of one per k.

`--engines N` measures N drafters at a time, each engine in its own process with 1/N of
the GPU's memory share and its own compile cache, so that their starts overlap. The table
is the one a drafter at a time makes, since tau comes from counters, not timings.

    coral-vllm bench acceptance --drafters eagle=DIR hass=DIR coral=DIR \\
        --router-report benchmarks/results/router_report_smollm2.json
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import sys
from pathlib import Path
from typing import Any

from coral_vllm.bench.args import add_drafters_arg, bench_parser, target_dir
from coral_vllm.bench.results import write_json
from coral_vllm.data.eval_sets import BENCHMARKS
from coral_vllm.named_paths import parse_drafters
from coral_vllm.runtime.device import device_name
from coral_vllm.runtime.engine_args import GPU_SHARE
from coral_vllm.runtime.metrics import SpecDecodeStats, from_llm_metrics
from coral_vllm.runtime.offline_engine import offline_engine
from coral_vllm.speculative_config import speculative_config

DATASETS = ("mtbench", "humaneval")


def tau_by_k(per_position_rate: list[float]) -> dict[int, float]:
    """tau at every j <= k from one k-token run: 1 + the first j positions' rates."""
    taus, tau = {}, 1.0
    for j, rate in enumerate(per_position_rate, start=1):
        tau += rate
        taus[j] = round(tau, 4)
    return taus


Prompts = dict[str, list[list[int]]]  # dataset -> token ids of its prompts


def measure(model: Path, drafter: Path, k: int, prompts: Prompts, max_tokens: int,
            gpu_share: float = GPU_SHARE, **engine: Any) -> dict[str, SpecDecodeStats]:
    """One engine's spec-decode counters per dataset; `engine`: more `vllm.LLM`
    arguments (the tests' eager engines)."""
    from vllm import SamplingParams, TokensPrompt

    with offline_engine(model, speculative_config(drafter, k), max_model_len=2048,
                        disable_log_stats=False,
                        gpu_only={"gpu_memory_utilization": gpu_share}, **engine) as llm:
        out = {}
        for name, ids in prompts.items():
            before = from_llm_metrics(llm.get_metrics())
            llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids],
                         SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)
            out[name] = from_llm_metrics(llm.get_metrics()) - before
        return out


def _measure_in_slot(results: multiprocessing.Queue, slot: int, engines: int,
                     args: tuple, engine: dict[str, Any]) -> None:
    """One engine of `measure_all`'s wave (a spawned process): its own compile cache, as
    engines starting together would write one cache at once, and 1/engines of the
    memory share; puts (slot, stats) or (slot, the error's text)."""
    root = os.environ.get("VLLM_CACHE_ROOT", str(Path.home() / ".cache" / "vllm"))
    os.environ["VLLM_CACHE_ROOT"] = f"{root}-engine{slot}"
    try:
        results.put((slot, measure(*args, gpu_share=GPU_SHARE / engines, **engine)))
    except BaseException as e:  # noqa: BLE001 - reported by the parent, naming the drafter
        results.put((slot, f"{type(e).__name__}: {e}"))


def measure_all(model: Path, drafters: dict[str, Path], k: int, prompts: Prompts,
                max_tokens: int, engines: int = 1,
                **engine: Any) -> dict[str, dict[str, SpecDecodeStats]]:
    """`measure` for every drafter, `engines` at a time (each in a process of its own when
    more than one); a failed engine stops the table naming its drafter."""
    if engines <= 1:
        return {name: measure(model, path, k, prompts, max_tokens, **engine)
                for name, path in drafters.items()}
    ctx = multiprocessing.get_context("spawn")  # CUDA is not forked
    items, out = list(drafters.items()), {}
    for start in range(0, len(items), engines):
        wave, results = items[start:start + engines], ctx.Queue()
        procs = [ctx.Process(target=_measure_in_slot,
                             args=(results, slot, len(wave),
                                   (model, path, k, prompts, max_tokens), engine))
                 for slot, (_, path) in enumerate(wave)]
        for p in procs:
            p.start()
        got: dict[int, object] = {}
        while len(got) < len(wave):
            try:
                slot, value = results.get(timeout=5)
                got[slot] = value
            except queue.Empty:
                if not any(p.is_alive() for p in procs) and results.empty():
                    break
        for p in procs:
            p.join()
        for slot, (name, _) in enumerate(wave):
            value = got.get(slot, f"its engine's process ended with exit code {procs[slot].exitcode}")
            if not isinstance(value, dict):
                raise RuntimeError(f"drafter {name}: {value}")
            out[name] = value
    return out


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser("acceptance", __doc__)
    add_drafters_arg(ap)
    ap.add_argument("--router-report", help="router stage report: held-out recall@k of "
                    "the chosen partition's router, or of its static_head for a static "
                    "drafter, goes into the rows of drafters that restrict their head")
    ap.add_argument("-k", type=int, default=5, help="tokens drafted per step (rows also "
                    "give tau at every smaller k: tau_by_k)")
    ap.add_argument("--datasets", nargs="+", choices=BENCHMARKS, default=list(DATASETS))
    ap.add_argument("--limit", type=int, default=20, help="prompts per dataset, at most")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--out", default="benchmarks/results/acceptance.json")
    ap.add_argument("--engines", type=int, default=1, help="drafters measured at a time, "
                    "each engine in its own process on the one device (the same table)")
    args = ap.parse_args(argv)

    import vllm
    from transformers import AutoTokenizer

    from coral_vllm.data.eval_sets import benchmark_prompts
    from coral_vllm.format.checkpoint import read_checkpoint
    from coral_vllm.training.router_train import chosen_selection

    drafters = parse_drafters(args.drafters)
    model = target_dir(args)
    tok = AutoTokenizer.from_pretrained(str(model))
    prompts = {d: benchmark_prompts(d, tok, args.limit) for d in args.datasets}
    recall = {}  # held-out recall@k of each head selection, from the router report
    if args.router_report:
        rep = json.loads(Path(args.router_report).read_text())
        recall["router"] = chosen_selection(rep)["recall_at_k"]
        recall["static"] = rep.get("static_head", {}).get("recall_at_k")
    corals = {name: read_checkpoint(path).coral for name, path in drafters.items()}  # all
    # read (a bad one named) before any engine starts
    measured = measure_all(model, drafters, args.k, prompts, args.max_tokens, args.engines)
    rows = []
    for name, coral in corals.items():
        routed = coral.top_k_groups < coral.num_groups
        for dataset, st in measured[name].items():
            tau = st.acceptance_length
            rows.append({"drafter": name, "dataset": dataset, "tau": round(tau, 4),
                         "tau_by_k": tau_by_k(st.per_position_rate),
                         "selection": coral.selection,
                         "recall_at_k": recall.get(coral.selection) if routed else None,
                         "active_groups": f"{coral.top_k_groups}/{coral.num_groups}"})
            print(f"{name:14s} {dataset:10s} tau {tau:.3f}", flush=True)
    result = {"target": str(model.name), "k": args.k,
              "device": device_name(),
              "vllm_version": vllm.__version__, "temperature": 0.0,
              # what each dataset gave (`--limit` is a cap: MT-bench has 80)
              "prompts_per_dataset": {d: len(p) for d, p in prompts.items()},
              "max_tokens": args.max_tokens,
              "measured_by": "vLLM spec-decode counters (chain drafting, target verifying)",
              "engines_at_a_time": args.engines,  # (the same counters either way)
              "rows": rows}
    write_json(Path(args.out), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
