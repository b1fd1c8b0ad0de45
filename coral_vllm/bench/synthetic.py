"""Drafter cost at realistic size: 8B-class targets with dummy weights and vLLM's
synthetic acceptance, plain decoding vs a dense-head EAGLE drafter vs a static
draft-vocabulary drafter vs the CORAL drafter.

No trained 8B weights exist here, so acceptance is SYNTHETIC: vLLM's
`rejection_sample_method: "synthetic"` accepts draft tokens at a set mean acceptance
length whatever they are, identically for both drafters. What differs is only what each
drafter costs per step: the same one-layer EAGLE drafter (random weights), with vLLM's
dense LM head, with a static reduced vocabulary (EAGLE-3 / FR-Spec: the ~32k most
frequent rows, one dense GEMM over them, `selection: "static"`), or with CORAL's router +
grouped head (top-8 of 64 groups, the Triton kernel on CUDA). Throughput differences are
therefore system cost, not acceptance.

One engine per variant, all started at once in their own processes (they share the
card; start-up overlaps), then measured one at a time, all variants of a cell back to
back. The acceptance length is switched between cells inside the running engines (the
rejection sampler's rate tensor is overwritten in place), and the counters confirm it.

    coral-vllm bench synthetic --shapes llama-3.1-8b qwen2.5-7b
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from coral_vllm.bench.args import (add_enforce_eager_arg, add_engine_resource_args,
                                   bench_parser, engine_resources)
from coral_vllm.bench.e2e import step_time_ratio
from coral_vllm.bench.results import write_json
from coral_vllm.format.checkpoint import read_checkpoint
from coral_vllm.runtime.device import device_name

# Public config.json values of the two targets (sizes only; weights are dummy).
SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128009,
        "torch_dtype": "bfloat16"},
    "qwen2.5-7b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584,
        "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
        "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "hidden_act": "silu",
        "sliding_window": 131072, "max_window_layers": 28, "use_sliding_window": False,
        "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645,
        "torch_dtype": "bfloat16"},
}
VARIANTS = ("plain", "eagle", "static", "coral")
# throughput ratios reported per cell: (numerator, denominator) variants
RATIO_PAIRS = (("coral", "eagle"), ("coral", "plain"), ("eagle", "plain"),
               ("coral", "static"), ("static", "eagle"), ("static", "plain"))


def static_top_k(shape: dict[str, Any], num_groups: int, rows: int) -> int:
    """The static drafter's top_k_groups: the groups nearest `rows` most frequent rows."""
    from coral_vllm.format.config import CoralConfig

    return CoralConfig.for_vocab(shape["vocab_size"], shape["hidden_size"], num_groups,
                                 1).with_active_rows(rows).top_k_groups


def prepare_shape(shape: dict[str, Any], root: Path, *, num_groups: int,
                  top_k_groups: int, static_rows: int) -> dict[str, Path | None]:
    """A config-only target dir and the three drafters for it (random weights: the
    drafter checkpoint checks read them; the engines then use dummy weights anyway)."""
    from coral_vllm.format.checkpoint import write_eagle_checkpoint
    from coral_vllm.model_store.drafter_init import init_drafter

    target = root / "target"
    target.mkdir(parents=True, exist_ok=True)
    (target / "config.json").write_text(json.dumps(shape, indent=2))
    coral = root / "coral"
    if not (coral / "config.json").is_file():
        init_drafter(target, coral, num_groups=num_groups, top_k_groups=top_k_groups)
    eagle = root / "eagle"
    if not (eagle / "config.json").is_file():
        write_eagle_checkpoint(coral, eagle)
    static_k = static_top_k(shape, num_groups, static_rows)
    static = root / f"static-top{static_k}-of-{num_groups}"
    if not (static / "config.json").is_file():
        init_drafter(target, static, num_groups=num_groups, top_k_groups=static_k,
                     partition="frequency", selection="static")
    return {"plain": None, "eagle": eagle, "static": static, "coral": coral,
            "target": target}


def set_synthetic_acceptance(worker: Any, length: float) -> list[float]:
    """Runs inside the engine's worker (collective_rpc): overwrite the rejection sampler's
    per-position conditional acceptance rates in place (same tensor, so captured graphs
    and kernels see the new values)."""
    import torch
    from vllm.config import SpeculativeConfig
    from vllm.v1.spec_decode.utils import unconditional_to_conditional_rates

    runner = worker.model_runner
    rates_t = runner.rejection_sampler.synthetic_conditional_rates
    k = rates_t.numel()
    rates = unconditional_to_conditional_rates(
        SpeculativeConfig._acceptance_length_to_rates(length, k))
    rates_t.copy_(torch.tensor(rates, dtype=rates_t.dtype))
    return rates


def run_batch(llm: Any, batch: int, prompt_len: int, max_tokens: int) -> dict[str, Any]:
    """`batch` requests at once (token-id prompts, no tokenizer), greedy, no early stop."""
    from vllm import SamplingParams, TokensPrompt

    from coral_vllm.runtime.metrics import from_llm_metrics

    prompts = [TokensPrompt(prompt_token_ids=[(7 * i + 13 * j) % 1000 + 100
                                              for j in range(prompt_len)])
               for i in range(batch)]
    params = dict(temperature=0, ignore_eos=True, detokenize=False)
    llm.generate(prompts[:1], SamplingParams(max_tokens=8, **params),
                 use_tqdm=False)  # warm-up, not timed
    before = from_llm_metrics(llm.get_metrics())
    t0 = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, **params), use_tqdm=False)
    wall = time.perf_counter() - t0
    stats = from_llm_metrics(llm.get_metrics()) - before
    return {"output_tokens": sum(len(o.outputs[0].token_ids) for o in outs), "wall_s": wall,
            "acceptance_length": stats.acceptance_length if stats.num_drafts else None}


def engine_worker(variant: str, dirs: dict[str, str | None], k: int, first_length: float | None,
                  engine_kwargs: dict[str, Any], conn: Any) -> None:
    """One engine in its own process: builds it, says ready, then runs what it is told."""
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc(fn)
    try:
        from coral_vllm.runtime.offline_engine import offline_engine

        spec = None
        if dirs[variant] is not None:
            spec = {"method": "eagle" if variant == "eagle" else "coral",
                    "model": dirs[variant], "num_speculative_tokens": k}
            if first_length is not None:
                spec.update(rejection_sample_method="synthetic",
                            synthetic_acceptance_length=first_length)
        with offline_engine(dirs["target"], spec, load_format="dummy", skip_tokenizer_init=True,
                            disable_log_stats=False, **engine_kwargs) as llm:
            conn.send(("ready", None))
            while True:
                cmd, arg = conn.recv()
                if cmd == "stop":
                    break
                if cmd == "acceptance":
                    conn.send(("ok", llm.collective_rpc(set_synthetic_acceptance, args=(arg,))[0]))
                    continue
                conn.send(("result", run_batch(llm, *arg)))
    except BaseException as e:  # the coordinator reports it; never hang it
        import traceback
        conn.send(("error", f"{variant}: {e!r}\n{traceback.format_exc()}"))


class Engines:
    """The variants' engine processes for one shape, started together."""

    def __init__(self, dirs: dict[str, Any], variants: list[str], k: int,
                 first_length: float | None,
                 engine_kwargs: dict[str, Any], timeout: float) -> None:
        ctx = mp.get_context("spawn")
        self.conns, self.procs = {}, {}
        sdirs = {n: None if p is None else str(p) for n, p in dirs.items()}
        for v in variants:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=engine_worker, name=f"engine-{v}", daemon=False,
                               args=(v, sdirs, k, first_length, engine_kwargs, child))
            proc.start()
            self.conns[v], self.procs[v] = parent, proc
        try:
            for v in variants:
                self._expect(v, "ready", timeout)
        except BaseException:
            self.close()
            raise

    def _expect(self, v: str, what: str, timeout: float) -> Any:
        if not self.conns[v].poll(timeout):
            raise TimeoutError(f"engine {v}: no {what!r} within {timeout:.0f}s")
        kind, payload = self.conns[v].recv()
        if kind == "error":
            raise RuntimeError(payload)
        return payload

    def ask(self, v: str, cmd: str, arg: Any, timeout: float = 600) -> Any:
        self.conns[v].send((cmd, arg))
        return self._expect(v, cmd, timeout)

    def close(self) -> None:
        for v, c in self.conns.items():
            if self.procs[v].is_alive():
                try:
                    c.send(("stop", None))
                except OSError:
                    pass
        for p in self.procs.values():
            p.join(timeout=60)
            if p.is_alive():
                p.kill()


def run(args: argparse.Namespace) -> dict[str, Any]:
    import vllm

    out = Path(args.out)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="coral-synthetic-"))
    result: dict[str, Any] = {
        "device": device_name(), "vllm_version": vllm.__version__,
        "acceptance_lengths": args.acceptance,
        "acceptance": "real: random drafters, standard rejection (smoke run)"
        if args.real_acceptance else
        "SYNTHETIC (vLLM rejection_sample_method='synthetic'): draft tokens accepted at "
        "the set mean length whatever they are; dummy weights",
        "k": args.k, "temperature": 0.0, "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens, "enforce_eager": args.enforce_eager,
        "drafters": {"eagle": "vLLM's EAGLE Llama drafter, dense LM head (method eagle)",
                     "static": f"same layer, no router, one dense GEMM over the ~"
                               f"{args.static_rows} most frequent rows (selection static, "
                               "method coral; rows per shape in static_rows)",
                     "coral": f"same layer, router + grouped head, top-{args.top_k_groups}"
                              f" of {args.num_groups} groups (method coral)"},
        "static_rows": {},
        "rows": [],
    }
    if args.extend:  # add shapes to an earlier run (same card, version and settings)
        prior = json.loads(Path(args.extend).read_text())
        for key in ("device", "vllm_version", "k", "max_tokens", "prompt_len", "acceptance",
                    "acceptance_lengths", "drafters"):
            if prior[key] != result[key]:
                raise SystemExit(f"--extend {args.extend}: {key} is {prior[key]!r} there, "
                                 f"{result[key]!r} here; results would not be comparable")
        result["rows"] = [r for r in prior["rows"] if r["shape"] not in args.shapes]
        for key in ("startup_s", "static_rows"):
            result[key] = {s: t for s, t in prior.get(key, {}).items()
                           if s not in args.shapes}
    engine_kwargs = {"max_model_len": args.prompt_len + args.max_tokens + 64,
                     "max_num_seqs": max(args.batches), **engine_resources(args)}
    if args.dtype:
        engine_kwargs["dtype"] = args.dtype
    if args.enforce_eager:
        engine_kwargs["enforce_eager"] = True
    for shape_name in args.shapes:
        shape = {**SHAPES[shape_name], **(json.loads(args.shape_override)
                                          if args.shape_override else {})}
        dirs = prepare_shape(shape, work / shape_name, num_groups=args.num_groups,
                             top_k_groups=args.top_k_groups, static_rows=args.static_rows)
        result["static_rows"][shape_name] = read_checkpoint(dirs["static"]).coral.active_rows
        print(f"== {shape_name}: starting {', '.join(args.variants)}", flush=True)
        t0 = time.perf_counter()
        lengths = [None] if args.real_acceptance else args.acceptance
        engines = Engines(dirs, args.variants, args.k, lengths[0], engine_kwargs,
                          args.startup_timeout)
        try:
            result.setdefault("startup_s", {})[shape_name] = round(time.perf_counter() - t0, 1)
            for length in lengths:
                for v in args.variants:
                    if v != "plain" and length is not None:
                        engines.ask(v, "acceptance", length)
                for batch in args.batches:
                    for v in args.variants:
                        if v == "plain" and length != lengths[0]:
                            continue  # plain decoding does not depend on acceptance
                        r = engines.ask(v, "run", (batch, args.prompt_len, args.max_tokens))
                        row = {"shape": shape_name, "drafter": v, "batch": batch,
                               "synthetic_acceptance_length": None if v == "plain" else length,
                               "measured_acceptance_length": None if r["acceptance_length"]
                               is None else round(r["acceptance_length"], 3),
                               "acceptance_as_set": None if v == "plain" or length is None
                               else abs(r["acceptance_length"] - length) < 0.25,
                               "output_tokens": r["output_tokens"],
                               "wall_s": round(r["wall_s"], 3),
                               "output_tok_s": round(r["output_tokens"] / r["wall_s"], 1)}
                        result["rows"].append(row)
                        print(f"{shape_name} acc={length} bs={batch:<3d} {v:6s} "
                              f"{row['output_tok_s']:9.1f} tok/s  measured acc "
                              f"{row['measured_acceptance_length']}", flush=True)
                    result["ratios"] = ratios(result["rows"], args.k)
                    write_json(out, result)
        finally:
            engines.close()
    result["targets"] = check_targets(result["ratios"], args.k)
    write_json(out, result)
    return result


def ratios(rows: list[dict[str, Any]], k: int | None = None) -> list[dict[str, Any]]:
    """Throughput ratios of the drafters present per shape, acceptance and batch
    (`RATIO_PAIRS`, plain being the one row per shape and batch); at batch 1 also each
    drafter's step-time ratio c (`e2e.step_time_ratio`, tau = the set length)."""
    cells: dict[tuple, dict[str, dict[str, Any]]] = {}
    plain: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        if r["drafter"] == "plain":
            plain[(r["shape"], r["batch"])] = r
        else:
            key = (r["shape"], r["batch"], r["synthetic_acceptance_length"])
            cells.setdefault(key, {})[r["drafter"]] = r
    out = []
    for (shape, batch, length), by in cells.items():
        if (shape, batch) in plain:
            by = {**by, "plain": plain[(shape, batch)]}
        row: dict[str, Any] = {"shape": shape, "batch": batch,
                               "synthetic_acceptance_length": length}
        for a, b in RATIO_PAIRS:
            if a in by and b in by:
                row[f"{a}_vs_{b}"] = round(by[a]["output_tok_s"] / by[b]["output_tok_s"], 3)
        if k and batch == 1 and "plain" in by and length:
            for name in VARIANTS[1:]:
                if name in by:
                    row[f"c_{name}"] = round(step_time_ratio(
                        1000 / by[name]["output_tok_s"], length,
                        1000 / by["plain"]["output_tok_s"], k), 3)
        out.append(row)
    return out


def check_targets(rs: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """The issues' targets at synthetic acceptance 3.5: CORAL >= 1.15x dense-head EAGLE at
    batch 1 and no slower at batch 64; never slower than the static-vocabulary drafter at
    any batch (equal acceptance by construction, so this compares cost only)."""
    out = []

    def add(target: str, measured: float | None, bar: float) -> None:
        if measured is not None:
            out.append({"target": target, "measured": measured, "met": measured >= bar})

    for r in rs:
        if r["synthetic_acceptance_length"] != 3.5:
            continue
        cell = f"{r['shape']}, batch {r['batch']}, synthetic acceptance 3.5"
        if r["batch"] == 1:
            add(f"{cell}, k={k}: CORAL >= 1.15x dense-head EAGLE", r.get("coral_vs_eagle"),
                1.15)
        if r["batch"] == 64:
            add(f"{cell}: CORAL no slower than dense-head EAGLE", r.get("coral_vs_eagle"), 1.0)
        add(f"{cell}: CORAL no slower than the static-vocabulary drafter",
            r.get("coral_vs_static"), 1.0)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser("synthetic", __doc__, target=False)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=sorted(SHAPES))
    p.add_argument("--shape-override", help="JSON merged into every shape's config (e.g. "
                   "fewer layers for a CPU smoke run)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--acceptance", nargs="+", type=float, default=[2.5, 3.5, 4.5],
                   help="synthetic mean acceptance lengths (bonus token included)")
    p.add_argument("--real-acceptance", action="store_true",
                   help="standard rejection instead (the random drafters then get nothing "
                   "accepted): a smoke run where vLLM lacks synthetic acceptance, e.g. CPU")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32, 64])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--num-groups", type=int, default=64)
    p.add_argument("--top-k-groups", type=int, default=8)
    p.add_argument("--static-rows", type=int, default=32768,
                   help="active rows of the static drafter (the top_k_groups nearest "
                   "this; default 32768, EAGLE-3's draft vocabulary)")
    p.add_argument("--dtype", help="engine dtype (default: vLLM's choice, bf16 on GPU)")
    add_enforce_eager_arg(p)
    # four engines (plain, eagle, static, coral) share the card: 4 x 0.22 < 1
    add_engine_resource_args(p, gpu_memory_utilization=0.22, kv_cache_gib=3, per="engine")
    p.add_argument("--work-dir", help="where target configs and drafters are written")
    p.add_argument("--out", default="benchmarks/results/e2e_synthetic.json")
    p.add_argument("--extend", metavar="RESULT.json", help="keep this earlier result's "
                   "other shapes (e.g. one shape per call on a time-limited host)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    for t in result["targets"]:
        print(f"{'MET ' if t['met'] else 'MISS'} {t['target']}: {t['measured']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
