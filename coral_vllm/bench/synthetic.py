"""Drafter cost at realistic size: target shapes of 1.5B-8B models with dummy weights and
vLLM's synthetic acceptance, plain decoding vs a dense-head EAGLE drafter vs a static
draft-vocabulary drafter vs the CORAL drafter, per-token and batch-shared groups.

No trained weights exist here for these targets, so acceptance is SYNTHETIC: vLLM's
`rejection_sample_method: "synthetic"` accepts draft tokens at a set mean acceptance
length whatever they are, identically for every drafter. What differs is only what each
drafter costs per step: the same one-layer EAGLE drafter (random weights), with vLLM's
dense LM head, with a static reduced vocabulary (EAGLE-3 / FR-Spec: the ~32k most
frequent rows, one dense GEMM over them, `selection: "static"`), or with CORAL's router +
grouped head (top-8 of 64 groups, the Triton kernel on CUDA), per drafted token
(`coral`) or one set for the whole draft step (`coral-shared`, `group_sharing:
"batch"`: k*G rows read per step at any batch, as static). Throughput differences are
therefore system cost, not acceptance.

One engine per variant, all started at once in their own processes (they share the
card; start-up overlaps). Each batch size is one cell, measured in rounds (`rounds.py`):
every round runs plain and every drafter at every acceptance length once, in a rotated
order, each measurement `passes` generate calls of `batch` fresh prompts sized to last
--min-seconds. The acceptance length is set inside the running engines before each
measurement that needs another (the rejection sampler's rate tensor is overwritten in
place), and the counters confirm it. Per cell: every variant's median tok/s with its
interval, every ratio with its interval, and the targets, met only where the whole
interval clears them.

    coral-vllm bench synthetic --shapes qwen2.5-1.5b llama-3.1-8b qwen2.5-7b

`--resume PRIOR.json` keeps the shapes an earlier run of the same settings finished and
runs only the others (one shape per command on a time-limited host).
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from coral_vllm.bench.args import (add_enforce_eager_arg, add_engine_resource_args,
                                   bench_parser, engine_resources)
from coral_vllm.bench.e2e import step_time_ratio
from coral_vllm.bench.results import write_json
from coral_vllm.bench.rounds import (add_rounds_args, cell_lines, compare, measure_rounds,
                                     measurement_row, rounds_of, target, target_line)
from coral_vllm.bench.shapes import TARGET_SHAPES
from coral_vllm.format.checkpoint import read_checkpoint
from coral_vllm.format.config import NUM_GROUPS, TOP_K_GROUPS
from coral_vllm.named_paths import PLAIN
from coral_vllm.runtime.device import device_name
from coral_vllm.speculative_config import METHOD, speculative_config

CORAL_SHARED = "coral-shared"
VARIANTS = (PLAIN, "eagle", "static", "coral", CORAL_SHARED)
# throughput ratios reported per cell: name -> (numerator, denominator) variants
RATIOS = {f"{a}_vs_{b}": (a, b) for a, b in (
    ("coral", "eagle"), ("coral", "plain"), ("eagle", "plain"), ("coral", "static"),
    ("static", "eagle"), ("static", "plain"), (CORAL_SHARED, "static"),
    (CORAL_SHARED, "coral"), (CORAL_SHARED, "eagle"))}
TARGET_ACCEPTANCE = 3.5  # the issues' targets are stated at this synthetic length
# settings that must match for --resume to keep an earlier run's shapes
COMPARABLE = ("device", "vllm_version", "acceptance", "acceptance_lengths", "k",
              "temperature", "prompt_len", "max_tokens", "enforce_eager", "drafters",
              "variants", "batches", "rounds", "min_seconds", "shape_override")


def static_top_k(shape: dict[str, Any], num_groups: int, rows: int) -> int:
    """The static drafter's top_k_groups: the groups nearest `rows` most frequent rows."""
    from coral_vllm.format.config import CoralConfig

    return CoralConfig.for_vocab(shape["vocab_size"], shape["hidden_size"], num_groups,
                                 1).with_active_rows(rows).top_k_groups


def prepare_shape(shape: dict[str, Any], root: Path, *, num_groups: int,
                  top_k_groups: int, static_rows: int) -> dict[str, Path | None]:
    """A config-only target dir and the four drafters for it (random weights: the
    drafter checkpoint checks read them; the engines then use dummy weights anyway)."""
    from coral_vllm.format.checkpoint import write_eagle_checkpoint
    from coral_vllm.model_store.drafter_init import init_drafter

    target = root / "target"
    target.mkdir(parents=True, exist_ok=True)
    (target / "config.json").write_text(json.dumps(shape, indent=2))
    coral = root / "coral"
    if not (coral / "config.json").is_file():
        init_drafter(target, coral, num_groups=num_groups, top_k_groups=top_k_groups)
    shared = root / CORAL_SHARED
    if not (shared / "config.json").is_file():
        init_drafter(target, shared, num_groups=num_groups, top_k_groups=top_k_groups,
                     group_sharing="batch")
    eagle = root / "eagle"
    if not (eagle / "config.json").is_file():
        write_eagle_checkpoint(coral, eagle)
    static_k = static_top_k(shape, num_groups, static_rows)
    static = root / f"static-top{static_k}-of-{num_groups}"
    if not (static / "config.json").is_file():
        init_drafter(target, static, num_groups=num_groups, top_k_groups=static_k,
                     partition="frequency", selection="static")
    return {"plain": None, "eagle": eagle, "static": static, "coral": coral,
            CORAL_SHARED: shared, "target": target}


def set_synthetic_acceptance(worker: Any, length: float) -> None:
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


def run_batch(llm: Any, batch: int, prompt_len: int, max_tokens: int, passes: int,
              prompt_ids: Iterator[int]) -> dict[str, Any]:
    """`passes` generate calls of `batch` requests at once (token-id prompts, no
    tokenizer), greedy, no early stop; every prompt is new (`prompt_ids`), so no pass
    reuses another's prefix cache."""
    import random

    from vllm import SamplingParams, TokensPrompt

    from coral_vllm.runtime.metrics import from_llm_metrics

    def prompts(n: int) -> list[Any]:
        return [TokensPrompt(prompt_token_ids=[rng.randrange(100, 1100)
                                               for _ in range(prompt_len)])
                for rng in (random.Random(next(prompt_ids)) for _ in range(n))]

    params = dict(temperature=0, ignore_eos=True, detokenize=False)
    llm.generate(prompts(1), SamplingParams(max_tokens=8, **params),
                 use_tqdm=False)  # warm-up, not timed
    before = from_llm_metrics(llm.get_metrics())
    tokens, wall = 0, 0.0
    for _ in range(passes):
        todo = prompts(batch)
        t0 = time.perf_counter()
        outs = llm.generate(todo, SamplingParams(max_tokens=max_tokens, **params),
                            use_tqdm=False)
        wall += time.perf_counter() - t0
        tokens += sum(len(o.outputs[0].token_ids) for o in outs)
    stats = from_llm_metrics(llm.get_metrics()) - before
    return {"output_tokens": tokens, "wall_s": round(wall, 3),
            "output_tok_s": round(tokens / wall, 1),
            "measured_acceptance_length": round(stats.acceptance_length, 3)
            if stats.num_drafts else None}


def engine_worker(variant: str, dirs: dict[str, str | None], k: int, first_length: float | None,
                  engine_kwargs: dict[str, Any], conn: Any) -> None:
    """One engine in its own process: builds it, says ready, then runs what it is told
    ("run": one measurement, at the acceptance length it names)."""
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc(fn)
    try:
        from coral_vllm.runtime.offline_engine import offline_engine

        spec = None
        if dirs[variant] is not None:
            spec = speculative_config(dirs[variant], k,
                                      method="eagle" if variant == "eagle" else METHOD)
            if first_length is not None:
                spec.update(rejection_sample_method="synthetic",
                            synthetic_acceptance_length=first_length)
        with offline_engine(dirs["target"], spec, load_format="dummy", skip_tokenizer_init=True,
                            disable_log_stats=False, **engine_kwargs) as llm:
            conn.send(("ready", None))
            length, prompt_ids = first_length, itertools.count()
            while True:
                cmd, arg = conn.recv()
                if cmd == "stop":
                    break
                batch, prompt_len, max_tokens, passes, want = arg
                if spec is not None and want is not None and want != length:
                    llm.collective_rpc(set_synthetic_acceptance, args=(want,))
                    length = want
                conn.send(("run", run_batch(llm, batch, prompt_len, max_tokens, passes,
                                            prompt_ids)))
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


def resume(prior_path: Path, result: dict[str, Any]) -> None:
    """Carries the shapes an earlier run finished into `result`, if that run had the same
    settings (`COMPARABLE`); otherwise says why none are kept."""
    if not prior_path.is_file():
        print(f"--resume {prior_path}: no such file; running every shape", flush=True)
        return
    prior = json.loads(prior_path.read_text())
    changed = [key for key in COMPARABLE if prior.get(key) != result[key]]
    if changed:
        print(f"--resume {prior_path}: {', '.join(changed)} differ from this run's; "
              "running every shape", flush=True)
        return
    done = result["shapes_done"] = prior["shapes_done"]
    result["rows"] = [r for r in prior["rows"] if r["shape"] in done]
    for key in ("shapes", "startup_s", "static_rows", "passes"):
        result[key] = {s: v for s, v in prior[key].items() if s in done}
    print(f"--resume {prior_path}: kept {', '.join(done) or 'no shape'}", flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import vllm

    out = Path(args.out)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="coral-synthetic-"))
    lengths: list[float | None] = [None] if args.real_acceptance else args.acceptance
    result: dict[str, Any] = {
        "device": device_name(), "vllm_version": vllm.__version__,
        "acceptance_lengths": args.acceptance,
        "acceptance": "real: random drafters, standard rejection (smoke run)"
        if args.real_acceptance else
        "SYNTHETIC (vLLM rejection_sample_method='synthetic'): draft tokens accepted at "
        "the set mean length whatever they are; dummy weights",
        "k": args.k, "temperature": 0.0, "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens, "enforce_eager": args.enforce_eager,
        "variants": args.variants, "batches": args.batches, "rounds": args.rounds,
        "min_seconds": args.min_seconds, "shape_override": args.shape_override,
        "drafters": {"eagle": "vLLM's EAGLE Llama drafter, dense LM head (method eagle)",
                     "static": f"same layer, no router, one dense GEMM over the ~"
                               f"{args.static_rows} most frequent rows (selection static, "
                               "method coral; rows per shape in static_rows)",
                     "coral": f"same layer, router + grouped head, top-{args.top_k_groups}"
                              f" of {args.num_groups} groups (method coral)",
                     CORAL_SHARED: f"coral with one set of top-{args.top_k_groups} groups "
                                   "for all tokens of a draft step (group_sharing batch)"},
        "shapes": {}, "shapes_done": [], "startup_s": {}, "static_rows": {}, "passes": {},
        "rows": [],
    }
    if args.resume:
        resume(Path(args.resume), result)
    engine_kwargs = {"max_model_len": args.prompt_len + args.max_tokens + 64,
                     "max_num_seqs": max(args.batches), **engine_resources(args)}
    if args.dtype:
        engine_kwargs["dtype"] = args.dtype
    if args.enforce_eager:
        engine_kwargs["enforce_eager"] = True
    # every round: plain once, every drafter once per acceptance length
    variants = ([(PLAIN, None)] if PLAIN in args.variants else []) + [
        (v, length) for length in lengths for v in args.variants if v != PLAIN]
    for shape_name in args.shapes:
        if shape_name in result["shapes_done"]:
            print(f"== {shape_name}: done in --resume's result, skipped", flush=True)
            continue
        shape = {**TARGET_SHAPES[shape_name],
                 **(json.loads(args.shape_override) if args.shape_override else {})}
        result["shapes"][shape_name] = shape
        dirs = prepare_shape(shape, work / shape_name, num_groups=args.num_groups,
                             top_k_groups=args.top_k_groups, static_rows=args.static_rows)
        result["static_rows"][shape_name] = read_checkpoint(dirs["static"]).coral.active_rows
        print(f"== {shape_name}: starting {', '.join(args.variants)}; then {len(args.batches)}"
              f" cells x {len(variants)} variants x {args.rounds} rounds, each measurement "
              f">= {args.min_seconds:g} s", flush=True)
        t0 = time.perf_counter()
        engines = Engines(dirs, args.variants, args.k, lengths[0], engine_kwargs,
                          args.startup_timeout)
        try:
            result["startup_s"][shape_name] = round(time.perf_counter() - t0, 1)
            for batch in args.batches:
                runs, passes = measure_rounds(
                    variants, lambda v, n: engines.ask(v[0], "run", (
                        batch, args.prompt_len, args.max_tokens, n, v[1])),
                    rounds=args.rounds, min_seconds=args.min_seconds)
                result["passes"].setdefault(shape_name, {})[str(batch)] = passes
                for (v, length), vruns in runs.items():
                    result["rows"].append({
                        "shape": shape_name, "drafter": v, "batch": batch,
                        "synthetic_acceptance_length": length,
                        "acceptance_as_set": None if length is None else all(
                            abs(r["measured_acceptance_length"] - length) < 0.25
                            for r in vruns),
                        **measurement_row(vruns)})
                result["ratios"] = ratios(result["rows"], args.k)
                for cell in result["ratios"]:
                    if (cell["shape"], cell["batch"]) == (shape_name, batch):
                        print("\n".join(cell_lines(
                            f"{shape_name} batch {batch} acceptance "
                            f"{cell['synthetic_acceptance_length']}", cell, "tok/s")),
                            flush=True)
                write_json(out, result)  # after every cell: a cut-off run keeps its rows
            result["shapes_done"].append(shape_name)
        finally:
            engines.close()
        write_json(out, result)
    result["ratios"] = ratios(result["rows"], args.k)
    result["targets"] = check_targets(result["ratios"], args.k)
    write_json(out, result)
    return result


def ratios(rows: list[dict[str, Any]], k: int | None = None) -> list[dict[str, Any]]:
    """Per shape, acceptance length and batch: the throughput ratios of the variants
    present (`RATIOS`, round by round, `rounds.compare`; plain is the one row per shape
    and batch), and at batch 1 each drafter's step-time ratio c (`e2e.step_time_ratio`
    on the median tok/s, tau = the set length)."""
    cells: dict[tuple, dict[str, dict[str, Any]]] = {}
    plain: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        if r["drafter"] == PLAIN:
            plain[(r["shape"], r["batch"])] = r
        else:
            key = (r["shape"], r["batch"], r["synthetic_acceptance_length"])
            cells.setdefault(key, {})[r["drafter"]] = r
    out = []
    for (shape, batch, length), by in cells.items():
        if (shape, batch) in plain:
            by = {PLAIN: plain[(shape, batch)], **by}
        row: dict[str, Any] = {"shape": shape, "batch": batch,
                               "synthetic_acceptance_length": length,
                               **compare({v: rounds_of(r) for v, r in by.items()}, RATIOS)}
        if k and batch == 1 and PLAIN in by and length:
            for name in VARIANTS[1:]:
                if name in by:
                    row[f"c_{name}"] = round(step_time_ratio(
                        1000 / by[name]["output_tok_s"], length,
                        1000 / by[PLAIN]["output_tok_s"], k), 3)
        out.append(row)
    return out


def check_targets(cells: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """The issues' targets at synthetic acceptance `TARGET_ACCEPTANCE`, per shape and
    batch: CORAL >= 1.15x dense-head EAGLE at batch 1, never below 0.98x of it, and never
    slower than the static-vocabulary drafter (equal acceptance by construction, so these
    compare cost only); the last two for batch-shared CORAL too. Met only where the
    ratio's whole interval clears the bar."""
    out = []
    for c in cells:
        if c["synthetic_acceptance_length"] != TARGET_ACCEPTANCE:
            continue
        where = f"{c['shape']}, batch {c['batch']}, synthetic acceptance {TARGET_ACCEPTANCE}"
        bars = [("coral_vs_eagle", 1.15, f"{where}, k={k}: CORAL >= 1.15x dense-head EAGLE")
                ] if c["batch"] == 1 else []
        bars += [("coral_vs_eagle", 0.98, f"{where}: CORAL >= 0.98x dense-head EAGLE"),
                 ("coral_vs_static", 1.0,
                  f"{where}: CORAL no slower than the static-vocabulary drafter"),
                 (f"{CORAL_SHARED}_vs_eagle", 0.98,
                  f"{where}: batch-shared CORAL >= 0.98x dense-head EAGLE"),
                 (f"{CORAL_SHARED}_vs_static", 1.0,
                  f"{where}: batch-shared CORAL no slower than the static drafter")]
        out += [target(text, c, name, bar) for name, bar, text in bars if name in c]
    return out


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser("synthetic", __doc__, target=False)
    p.add_argument("--shapes", nargs="+", default=list(TARGET_SHAPES),
                   choices=sorted(TARGET_SHAPES))
    p.add_argument("--shape-override", help="JSON merged into every shape's config (e.g. "
                   "fewer layers for a CPU smoke run)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--acceptance", nargs="+", type=float, default=[2.5, TARGET_ACCEPTANCE, 4.5],
                   help="synthetic mean acceptance lengths (bonus token included); the "
                   f"targets are checked at {TARGET_ACCEPTANCE}")
    p.add_argument("--real-acceptance", action="store_true",
                   help="standard rejection instead (the random drafters then get nothing "
                   "accepted): a smoke run where vLLM lacks synthetic acceptance, e.g. CPU")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32, 64])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=256)
    add_rounds_args(p)
    p.add_argument("--num-groups", type=int, default=NUM_GROUPS)
    p.add_argument("--top-k-groups", type=int, default=TOP_K_GROUPS)
    p.add_argument("--static-rows", type=int, default=32768,
                   help="active rows of the static drafter (the top_k_groups nearest "
                   "this; default 32768, EAGLE-3's draft vocabulary)")
    p.add_argument("--dtype", help="engine dtype (default: vLLM's choice, bf16 on GPU)")
    add_enforce_eager_arg(p)
    # five engines (plain, eagle, static, coral, coral-shared) share the card: 5 x 0.18 < 1
    add_engine_resource_args(p, gpu_memory_utilization=0.18, kv_cache_gib=3, per="engine")
    p.add_argument("--work-dir", help="where target configs and drafters are written")
    p.add_argument("--out", default="benchmarks/results/e2e_synthetic.json")
    p.add_argument("--resume", metavar="PRIOR.json", help="keep the shapes this earlier "
                   "result finished, if it had the same settings, and run only the others "
                   "(one shape per command on a time-limited host)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    for t in result["targets"]:
        print(target_line(t))
    return 0


if __name__ == "__main__":
    sys.exit(main())
