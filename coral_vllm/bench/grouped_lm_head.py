"""Grouped LM head vs dense head: timings, bandwidth, and a GPU correctness check.

GPU run:

    coral-vllm bench grouped-lm-head --out $OUT/lm_head.json    # benchmark (5 rounds a cell)
    coral-vllm bench grouped-lm-head --check            # correctness + CUDA graphs

CPU smoke test of the same logic (Triton interpreter, tiny shapes):

    coral-vllm bench grouped-lm-head --device cpu --tiny --out /tmp/b/lm_head.json

What is measured, per head shape (d, V) (`shapes.HEAD_SHAPES`), tokens n and active
fraction f = k / N (N = 256 groups, G = V / N rows each, so k = 8, 16, 32, 64 for
f = 1/32 .. 1/4), each in --rounds rounds of every method in a rotated order
(`rounds.py`; a row holds each method's median, and with its intervals every method's
and the two speedups' summaries):

* dense_ms   -- bf16 `h @ W.T` over the full vocabulary (cuBLAS), logits only (the
                issue's baseline, although every grouped method below includes its top-1);
* dense_top1_ms -- the same plus `argmax(-1)`: what a dense-head drafter runs for a greedy
                draft (vLLM: `compute_logits(h).argmax(-1)`); speedup_vs_dense_top1 is
                dense_top1_ms / grouped_ms;
* static_ms  -- the static draft-vocabulary head at the same active rows (k*G most
                frequent tokens, `static_top1`: one cuBLAS GEMM over that contiguous
                slice + max), the EAGLE-3 / FR-Spec baseline; speedup_vs_static is
                static_ms / grouped_ms;
* gather_ms  -- torch fallback of the draft step: `grouped_logits_torch` (gathers the
                k*G rows per token when n*k < N, else scores every row and picks
                columns) + max over the columns;
* grouped_ms -- `grouped_top1_triton` (auto path), the hot path: fused top-1;
* shared_ms  -- batch-shared groups (`group_sharing: "batch"`, `shared_top1_triton`):
                all n tokens over one list of k groups (token 0's), each row read once
                for the batch, k*G rows like static_ms; shared_vs_static is
                static_ms / shared_ms, shared_vs_grouped grouped_ms / shared_ms;
* per_token_ms / union_ms / dense_path_ms -- the same call with each path forced (tuning
  the rule; dense_path = cuBLAS scores of every row + the Triton column select);
* grouped_bandwidth_gbs -- bytes the grouped kernel must read (distinct activated groups
  of the batch * G * d * 2 + hidden) / grouped time.

Group choices are independent uniform per token. Timing: each method is captured once
per row into a CUDA graph of R = 8 calls cycling through 8 group-choice sets and (for
heads < 256 MB) several weight copies so back-to-back calls do not hit L2; in every round
triton.testing.do_bench times that graph's replays (it flushes L2 before each; ~40 ms of
replays per measurement) and the median is divided by R. Falls back to plain do_bench if
capture fails. Target: the grouped head >= 0.98x dense in every cell, met only where
every cell's interval clears it.

Offline, no GPU: `coral-vllm bench grouped-lm-head --replay benchmarks/results/lm_head.json`
applies the current `choose_path` to every row of a measured run and prints the auto
path's ratio to the dense head it would get, taking the chosen path's forced-path timing
(round by round against dense_ms). That is a prediction for a rule changed after the run,
not a measurement: the next GPU run times the auto path itself.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

from coral_vllm.bench.args import bench_parser
from coral_vllm.bench.results import write_json
from coral_vllm.bench.rounds import (add_rounds_args, compare, every_cell_target, fmt,
                                     measure_rounds, ratio_of, target_line)
from coral_vllm.bench.stats import ratio_summary
from coral_vllm.bench.shapes import HEAD_SHAPES
from coral_vllm.runtime.device import device_name

TOKENS = [1, 4, 16, 64]
FRACTIONS = [1 / 32, 1 / 16, 1 / 8, 1 / 4]
NUM_GROUPS = 256
# tiny: n = 1 takes the per-token path, n = 4 (n*k >= N/2) the union path; the forced paths
# cover the dense one
TINY_SHAPES = {"tiny": (64, 512)}
TINY_TOKENS = [1, 4]
TINY_FRACTIONS = [1 / 4]
TINY_GROUPS = 16
REPS_IN_GRAPH = 8
# row key of each forced-path timing ("dense_ms" is the cuBLAS logits-only baseline)
PATH_KEYS = {"per_token": "per_token_ms", "union": "union_ms", "dense": "dense_path_ms"}
# the speedups a row reports: name -> (numerator, denominator) timings
SPEEDUPS = {"speedup_vs_dense": ("dense_ms", "grouped_ms"),
            "speedup_vs_dense_top1": ("dense_top1_ms", "grouped_ms"),
            "speedup_vs_static": ("static_ms", "grouped_ms"),
            "shared_vs_static": ("static_ms", "shared_ms"),
            "shared_vs_grouped": ("grouped_ms", "shared_ms")}
WORST_CELL_BAR = 0.98  # the target: grouped >= 0.98x dense in every cell


def parse_args(argv=None):
    p = bench_parser("grouped-lm-head", __doc__, target=False)
    p.add_argument("--out", default="benchmarks/results/lm_head.json",
                   help="result JSON; the plot goes next to it (.png)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny)")
    p.add_argument("--tiny", action="store_true",
                   help="tiny shapes, for a CPU/interpreter smoke test of the script")
    p.add_argument("--check", action="store_true",
                   help="run correctness checks (all paths, dtypes, CUDA-graph replay) "
                        "instead of the benchmark")
    p.add_argument("--no-sweep", action="store_true", help="skip the block-size sweep")
    p.add_argument("--groups", type=int, default=None,
                   help=f"number of groups N (default {NUM_GROUPS}, tiny {TINY_GROUPS})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--replay", metavar="JSON",
                   help="no benchmark: the auto ratio the current path rule would get on "
                        "this measured run (from its forced-path timings)")
    p.add_argument("--budget", type=float, default=300.0,
                   help="seconds; past this, forced-path timings and the sweep are skipped")
    add_rounds_args(p, min_seconds=False)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- timing


class Timer:
    def __init__(self, device):
        self.device = device
        self.cuda = device.startswith("cuda")

    def __call__(self, calls):
        """Median ms per call of a list of zero-arg callables (run in sequence)."""
        return self.prepare(calls)()

    def prepare(self, calls: list[Callable[[], Any]]) -> Callable[[], float]:
        """Warms `calls` up (and on CUDA captures them into a graph) once; returns a
        measurement, ms per call, to repeat in every round."""
        import torch
        if not self.cuda:   # smoke test only: one untimed pass now, one timed per round
            for c in calls:
                c()

            def one_pass():
                t0 = time.perf_counter()
                for c in calls:
                    c()
                return (time.perf_counter() - t0) * 1e3 / len(calls)
            return one_pass
        from triton.testing import do_bench
        for c in calls:   # warm up / compile outside the capture
            c()
        torch.cuda.synchronize()
        try:
            graph = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for c in calls:
                    c()
            torch.cuda.current_stream().wait_stream(stream)
            with torch.cuda.graph(graph):
                for c in calls:
                    c()
            torch.cuda.synchronize()
            return lambda: do_bench(graph.replay, warmup=10, rep=40,
                                    return_mode="median") / len(calls)
        except Exception as exc:  # pragma: no cover - GPU only
            print(f"  (graph capture failed: {exc!r}; timing without graphs)")
            def run_all():
                for c in calls:
                    c()
            return lambda: do_bench(run_all, warmup=10, rep=40,
                                    return_mode="median") / len(calls)


def copy_bandwidth_gbs(device, tiny):
    import torch
    nbytes = (8 << 20) if tiny else (1 << 30)
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = Timer(device)([lambda: dst.copy_(src)])
    del src, dst
    return 2 * nbytes / (ms * 1e-3) / 1e9


# --------------------------------------------------------------------------- benchmark


def bench_row(glh, torch_ref, timer, d, vocab, n, frac, num_groups, weights, rows, device,
              gen, rounds, alt_paths=True):
    """One cell: every method prepared once, then timed in `rounds` rotated rounds."""
    import torch
    from coral_vllm.head.static_lm_head import static_top1
    from coral_vllm.kernels.shared_lm_head import shared_top1_triton
    G = math.ceil(vocab / num_groups)
    k = max(1, round(frac * num_groups))
    sets = [torch.randint(0, num_groups, (n, k), generator=gen).to(device)
            for _ in range(REPS_IN_GRAPH)]
    hidden = torch.randn(n, d, generator=gen).to(device=device, dtype=torch.bfloat16)
    dense_w = [w[:vocab] for w in weights]    # stands in for the unpermuted head
    ncopy = len(weights)
    idx = range(REPS_IN_GRAPH)

    def dense(i):
        return lambda: torch.matmul(hidden, dense_w[i % ncopy].T)

    def dense_top1(i):
        return lambda: torch.matmul(hidden, dense_w[i % ncopy].T).argmax(-1)

    def gather(i):
        def f():
            logits, tokens = torch_ref(hidden, weights[i % ncopy], rows, sets[i], G)
            logits.max(dim=-1)
        return f

    outs_v = torch.empty(n, device=device)
    outs_t = torch.empty(n, dtype=torch.int64, device=device)

    def grouped(i, path):
        return lambda: glh.grouped_top1_triton(hidden, weights[i % ncopy], rows, sets[i], G,
                                               1.0, outs_v, outs_t, path=path)

    row = {"d": d, "vocab": vocab, "tokens": n, "active_fraction": frac, "groups": num_groups,
           "k": k, "group_size": G}
    static_rows = min(k * G, vocab)
    auto = glh.choose_path(n, k, num_groups, G, d)
    row["path"] = auto
    methods = {"dense_ms": [dense(i) for i in idx],
               "dense_top1_ms": [dense_top1(i) for i in idx],
               "static_ms": [(lambda w=weights[i % ncopy]: static_top1(
                   hidden, w, rows, static_rows)) for i in idx],
               "gather_ms": [gather(i) for i in idx],
               "grouped_ms": [grouped(i, "auto") for i in idx],
               "shared_ms": [(lambda w=weights[i % ncopy], s=sets[i][0]: shared_top1_triton(
                   hidden, w, rows, s, G)) for i in idx]}
    if alt_paths:
        methods.update({PATH_KEYS[other]: [grouped(i, other) for i in idx]
                        for other in PATH_KEYS if other != auto})
    measure = {key: timer.prepare(calls) for key, calls in methods.items()}
    runs, _ = measure_rounds(list(measure), lambda key, _: {"ms": measure[key]()},
                             rounds=rounds)
    values = {key: [r["ms"] for r in rs] for key, rs in runs.items()}
    row.update({key: statistics.median(v) for key, v in values.items()})
    row[PATH_KEYS[auto]] = row["grouped_ms"]
    distinct = sum(int(torch.unique(s).numel()) for s in sets) / len(sets)
    need = distinct * G * d * 2 + n * d * 2
    row["distinct_groups"] = distinct
    row["grouped_bytes"] = need
    row["grouped_bandwidth_gbs"] = need / (row["grouped_ms"] * 1e-3) / 1e9
    row.update(compare(values, SPEEDUPS, digits=6))
    return row


def make_weights(d, vocab, num_groups, device, gen, tiny):
    import torch
    G = math.ceil(vocab / num_groups)
    wbytes = num_groups * G * d * 2
    ncopy = 1 if tiny else max(1, min(4, math.ceil((256 << 20) / wbytes)))
    weights = []
    for _ in range(ncopy):
        w = torch.empty(num_groups * G, d, dtype=torch.bfloat16, device=device)
        w.normal_(generator=None)
        w[vocab:] = 0
        weights.append(w)
    rows = torch.full((num_groups * G,), -1, dtype=torch.int64, device=device)
    rows[:vocab] = torch.randperm(vocab, generator=gen).to(device)
    return weights, rows


def sweep(glh, timer, device, gen, tiny):
    """A few block configurations at the target points, to tune the defaults.

    Dense-path points: the fully covered n = 64 small heads, where it has to stay within
    10% of cuBLAS: one-pass top-1 (no reduce launch) or not, select block size, and what
    fp32 scores (SCORES_FP32) would cost.
    """
    import torch
    out = []
    points = [((4096, 128256), 1, 1 / 8, "per_token",
               [{"BLOCK_R": br, "num_warps": nw, "num_stages": ns}
                for br in (8, 16, 32) for nw in (4, 8) for ns in (1, 3)]),
              ((4096, 128256), 64, 1 / 4, "union",
               [{"BLOCK_R": br, "BLOCK_D": bd, "num_warps": nw, "num_stages": ns}
                for br, bd, nw, ns in ((64, 64, 4, 4), (128, 64, 4, 4), (128, 64, 8, 4),
                                       (128, 128, 8, 3), (256, 64, 8, 3), (64, 128, 4, 3))])]
    points += [((576, 49152), 64, 1 / 4, "dense",
                [{}, {"ONE_PASS": False}, {"ONE_PASS": False, "BLOCK": 256},
                 {"BLOCK": 2048}, {"SCORES_FP32": True}]),
               ((640, 262144), 64, 1 / 4, "dense",
                [{}, {"BLOCK": 256}, {"BLOCK": 1024}, {"num_warps": 8},
                 {"ONE_PASS": True, "BLOCK": 4096}, {"SCORES_FP32": True}])]
    if tiny:
        points = [((64, 1000), 1, 1 / 8, "per_token", [{"BLOCK_R": 16}, {"BLOCK_R": 32}]),
                  ((64, 1000), 16, 1 / 4, "union", [{"BLOCK_R": 64}, {"BLOCK_R": 128}]),
                  ((64, 1000), 16, 1 / 4, "dense", [{}, {"ONE_PASS": False, "BLOCK": 64}])]
    num_groups = TINY_GROUPS if tiny else NUM_GROUPS
    for (d, vocab), n, frac, path, configs in points:
        # weight copies as in the main rows (small heads would otherwise sit in L2)
        weights, rows = make_weights(d, vocab, num_groups, device, gen, tiny)
        G = math.ceil(vocab / num_groups)
        k = round(frac * num_groups)
        sets = [torch.randint(0, num_groups, (n, k), generator=gen).to(device)
                for _ in range(REPS_IN_GRAPH)]
        hidden = torch.randn(n, d, generator=gen).to(device=device, dtype=torch.bfloat16)
        ov = torch.empty(n, device=device)
        ot = torch.empty(n, dtype=torch.int64, device=device)
        for cfg in configs:
            try:
                ms = timer([(lambda s=s, w=weights[i % len(weights)], cfg=cfg:
                             glh.grouped_top1_triton(hidden, w, rows, s, G, 1.0, ov, ot,
                                                     path=path, config=cfg))
                            for i, s in enumerate(sets)])
            except Exception as exc:  # pragma: no cover - a config may not compile
                ms = None
                print(f"  sweep {cfg}: failed {exc!r}")
            out.append({"d": d, "vocab": vocab, "tokens": n, "active_fraction": frac,
                        "path": path, "config": cfg, "ms": ms})
            print(f"  sweep d={d} V={vocab} n={n} f={frac:.4g} {path} {cfg}: "
                  f"{'-' if ms is None else f'{ms:.4f} ms'}")
        del weights
    return out


def run_benchmark(args):
    import torch
    import coral_vllm.kernels.grouped_lm_head as glh
    from coral_vllm.head.grouped_lm_head import grouped_logits_torch
    global REPS_IN_GRAPH
    device = args.device
    tiny = args.tiny
    if tiny:
        REPS_IN_GRAPH = 1
    gen = torch.Generator().manual_seed(args.seed)
    timer = Timer(device)
    t_start = time.time()
    name = device_name() if device.startswith("cuda") else "CPU (Triton interpreter)"
    copy_bw = copy_bandwidth_gbs(device, tiny)
    print(f"device: {name}; copy bandwidth {copy_bw:.1f} GB/s (read + write)")
    num_groups = args.groups or (TINY_GROUPS if tiny else NUM_GROUPS)
    shapes = TINY_SHAPES if tiny else HEAD_SHAPES
    out = Path(args.out)
    result = {"device": name, "copy_bandwidth_gbs": copy_bw, "num_groups": num_groups,
              "shapes": shapes, "rounds": args.rounds,
              "timing": f"CUDA graph of {REPS_IN_GRAPH} calls, do_bench median / call, "
                        "in every round" if device.startswith("cuda") else
                        "one timed pass per round (Triton interpreter: smoke test only)",
              "rows": [], "sweep": []}
    rows_out = result["rows"]
    for shape, (d, vocab) in shapes.items():
        weights, rows = make_weights(d, vocab, num_groups, device, gen, tiny)
        for n in (TINY_TOKENS if tiny else TOKENS):
            for frac in (TINY_FRACTIONS if tiny else FRACTIONS):
                r = {"shape": shape, **bench_row(
                    glh, grouped_logits_torch, timer, d, vocab, n, frac, num_groups, weights,
                    rows, device, gen, args.rounds,
                    alt_paths=time.time() - t_start < args.budget)}
                rows_out.append(r)
                print(f"{cell_label(r)} {r['path']:9s} dense {r['dense_ms']:.4f} static "
                      f"{r['static_ms']:.4f} gather {r['gather_ms']:.4f} grouped "
                      f"{r['grouped_ms']:.4f} ms  vs dense {speedup(r, 'speedup_vs_dense')}  "
                      f"vs dense top-1 {speedup(r, 'speedup_vs_dense_top1')}  "
                      f"vs static {speedup(r, 'speedup_vs_static')}  shared "
                      f"{r['shared_ms']:.4f} ms vs static {speedup(r, 'shared_vs_static')}  "
                      f"{r['grouped_bandwidth_gbs']:.0f} GB/s  [{time.time() - t_start:.0f}s]",
                      flush=True)
                write_json(out, result)  # after every cell: a cut-off run keeps its rows
        del weights, rows
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    over = time.time() - t_start > args.budget
    if over and not args.no_sweep:
        print(f"over the {args.budget:.0f}s budget: sweep skipped")
    result["sweep"] = [] if args.no_sweep or over else sweep(glh, timer, device, gen, tiny)
    result["targets"] = [every_cell_target(
        f"grouped head (auto path) >= {WORST_CELL_BAR}x dense in every cell", rows_out,
        "speedup_vs_dense", WORST_CELL_BAR, cell_label), every_cell_target(
        "batch-shared head >= 1x static in every cell", rows_out, "shared_vs_static", 1.0,
        cell_label)]
    write_json(out, result)
    print(f"wrote {out}")
    try:
        from coral_vllm.bench.plots import plot_file
        print(f"wrote {plot_file(out)}")
    except ImportError:
        print(f"matplotlib not installed: no plot (`coral-vllm bench plot {out}` elsewhere)")
    print(f"\n{'shape':14s}     d  vocab   n frac  path       dense_ms static_ms gather_ms "
          "grouped_ms per_tok_ms   union_ms dense_path  shared_ms   GB/s %copy  vs dense, "
          "vs static, shared vs static: median [interval] call")
    for r in rows_out:
        frac = f"1/{round(1 / r['active_fraction'])}"
        alt = [r.get(key) for key in PATH_KEYS.values()]
        alt = " ".join(f"{a:10.4f}" if a is not None else f"{'-':>10s}" for a in alt)
        print(f"{r['shape']:14s} {r['d']:5d} {r['vocab']:6d} {r['tokens']:3d} {frac:5s} "
              f"{r['path']:9s} {r['dense_ms']:9.4f} {r['static_ms']:9.4f} "
              f"{r['gather_ms']:9.4f} {r['grouped_ms']:10.4f} {alt} {r['shared_ms']:10.4f} "
              f"{r['grouped_bandwidth_gbs']:6.0f} "
              f"{100 * r['grouped_bandwidth_gbs'] / copy_bw:5.1f}  "
              f"{speedup(r, 'speedup_vs_dense')}, {speedup(r, 'speedup_vs_static')}, "
              f"{speedup(r, 'shared_vs_static')}")
    for t in result["targets"]:
        print(target_line(t))
    print(f"total {time.time() - t_start:.0f}s")


def cell_label(r: dict[str, Any]) -> str:
    """A row's cell as printed: head shape, tokens, active fraction."""
    return f"{r['shape']} n={r['tokens']} f=1/{round(1 / r['active_fraction'])}"


def speedup(r: dict[str, Any], name: str) -> str:
    """'x median [low, high] call' of one of a row's speedups (`SPEEDUPS`)."""
    s = ratio_of(r, name)
    return f"x{fmt(s)}" + (f" {s['difference']}" if "difference" in s else "")


# --------------------------------------------------------------------------- replay


def forced_path_rounds(row: dict[str, Any], path: str) -> list[float] | None:
    """Per-round ms of `path` forced in a measured row (the auto path the run chose was
    timed as grouped_ms), or None where the run did not time it (past --budget)."""
    key = "grouped_ms" if path == row["path"] else PATH_KEYS[path]
    if key not in row:
        return None
    if "intervals" in row:
        return row["intervals"]["variants"][key]["values"]
    return [row[key]]


def replay(result: dict[str, Any], choose: Callable[..., str] | None = None
           ) -> dict[str, Any]:
    """The auto path's ratio to the dense head under `choose` (default: the current
    `choose_path`, bf16 as in the run) on a measured run, predicted from its forced-path
    timings: {"cells": one per row, "target": the every-cell target over them,
    "unmeasured": labels of rows whose chosen path the run did not time}.

    Each cell's ratio is formed round by round (dense_ms over the chosen path's time in
    the same round), as the benchmark forms speedup_vs_dense, so a cell whose path is
    unchanged gets exactly its measured ratio."""
    if choose is None:
        from coral_vllm.kernels.grouped_lm_head import choose_path as choose
    cells, unmeasured = [], []
    for row in result["rows"]:
        path = choose(row["tokens"], row["k"], row["groups"], row["group_size"], row["d"])
        cell = {"shape": row["shape"], "tokens": row["tokens"],
                "active_fraction": row["active_fraction"], "measured_path": row["path"],
                "path": path}
        ms = forced_path_rounds(row, path)
        if ms is None:
            unmeasured.append(cell_label(row))
        else:
            dense = row["intervals"]["variants"]["dense_ms"]["values"] \
                if "intervals" in row else [row["dense_ms"]]
            s = ratio_summary(dense, ms)
            cell.update(predicted_ms=statistics.median(ms), speedup_vs_dense=s["median"],
                        intervals={"ratios": {"speedup_vs_dense": s}})
        cells.append(cell)
    target = every_cell_target(
        f"PREDICTED from forced-path timings: grouped head (auto path) >= "
        f"{WORST_CELL_BAR}x dense in every cell", cells, "speedup_vs_dense", WORST_CELL_BAR,
        cell_label)
    return {"cells": cells, "target": target, "unmeasured": unmeasured}


def run_replay(path: str) -> int:
    """Prints `replay` of a result file: every cell, the changed paths marked, then the
    predicted worst cell."""
    result = json.loads(Path(path).read_text())
    rep = replay(result)
    print(f"replay of {path} ({result.get('device', '?')}): the current choose_path on its "
          "rows, each taken at its forced path's measured time (a prediction, not a "
          "measurement)")
    for c in rep["cells"]:
        moved = f"{c['measured_path']} -> {c['path']}" if c["path"] != c["measured_path"] \
            else c["path"]
        if "speedup_vs_dense" in c:
            print(f"  {cell_label(c):32s} {moved:20s} {c['predicted_ms']:.4f} ms  "
                  f"vs dense x{fmt(ratio_of(c, 'speedup_vs_dense'))}")
        else:
            print(f"  {cell_label(c):32s} {moved:20s} not timed in this run")
    changed = sum(c["path"] != c["measured_path"] for c in rep["cells"])
    print(f"{changed} of {len(rep['cells'])} cells change path")
    if rep["unmeasured"]:
        print(f"no prediction for {len(rep['unmeasured'])} cells (path not timed): "
              + ", ".join(rep["unmeasured"]))
    print(target_line(rep["target"]) + f" ({rep['target']['cells_met']} of "
          f"{rep['target']['cells']} cells met)")
    return 0


# --------------------------------------------------------------------------- check


def fp32_scores_supported(device):
    """Whether torch.mm(bf16, bf16, out_dtype=float32) runs here (CUDA, recent torch)."""
    import torch
    a = torch.zeros(2, 16, dtype=torch.bfloat16, device=device)
    try:
        torch.mm(a, a.T, out_dtype=torch.float32)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return True


def run_check(args):
    """GPU correctness: all three paths, three dtypes, ragged groups, CUDA-graph replay."""
    import torch
    import coral_vllm.kernels.grouped_lm_head as glh
    from coral_vllm.head.grouped_lm_head import grouped_logits_torch
    device = args.device
    gen = torch.Generator().manual_seed(args.seed)
    failures = []
    fp32_scores = fp32_scores_supported(device)
    print(f"dense path with SCORES_FP32 (torch.mm out_dtype): "
          f"{'checked' if fp32_scores else 'not supported here, skipped'}")
    cases = [(1000, 64, 128, 1, 3), (1000, 64, 128, 70, 5), (5000, 100, 576, 4, 8),
             (20000, 79, 1024, 16, 32), (32000, 128, 4096, 64, 16), (333, 10, 40, 3, 4)]
    if args.tiny:
        cases = [(130, 20, 48, 5, 3), (55, 12, 40, 70, 2)]
    for vocab, G, d, n, k in cases:
        N = math.ceil(vocab / G)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            w = torch.randn(N * G, d, generator=gen).to(dtype)
            w[vocab:] = 0
            rows = torch.full((N * G,), -1, dtype=torch.int64)
            rows[:vocab] = torch.randperm(vocab, generator=gen)
            gids = torch.randint(0, N, (n, k), generator=gen)
            gids[0, :] = N - 1                 # ragged group, duplicates within a token
            hidden = torch.randn(n, d, generator=gen)
            ref, ref_tok = grouped_logits_torch(hidden.to(dtype).double(), w.double(), rows,
                                                gids, G, 0.5)
            h, wd, rt, gi = (t.to(device) for t in (hidden, w, rows, gids))
            tol = 1e-4 if dtype == torch.float32 else 1e-2
            mag = ref[torch.isfinite(ref)].abs().max().clamp(min=1)
            variants = [(p, None) for p in (*PATH_KEYS, "auto")]
            if fp32_scores:
                variants.append(("dense", {"SCORES_FP32": True}))
            for path, cfg in variants:
                L = torch.full((n, k * G), float("nan"), device=device)
                T = torch.full((n, k * G), -7777, dtype=torch.int64, device=device)
                glh.grouped_logits_triton(h, wd, rt, gi, G, 0.5, L, T, path=path, config=cfg)
                L, T = L.cpu().double(), T.cpu()
                fin = torch.isfinite(ref)
                ok = (torch.equal(T, ref_tok) and torch.equal(torch.isinf(L), torch.isinf(ref))
                      and not torch.isnan(L).any()
                      and float((L[fin] - ref[fin]).abs().max()) <= tol * float(mag))
                v, t = glh.grouped_top1_triton(h, wd, rt, gi, G, 0.5, path=path, config=cfg)
                v, t = v.cpu().double(), t.cpu()
                rmax = ref.max(1).values
                ok_top = bool(((v - rmax).abs() <= tol * mag).all())
                for i in range(n):
                    cols = (ref_tok[i] == t[i])
                    ok_top &= bool(cols.any()) and float((ref[i][cols].max() - rmax[i]).abs()) \
                        <= tol * float(mag)
                status = "ok" if ok and ok_top else "FAIL"
                if status == "FAIL":
                    failures.append((vocab, G, d, n, k, str(dtype), path, cfg))
                print(f"V={vocab} G={G} d={d} n={n} k={k} {str(dtype):15s} {path:9s} "
                      f"{'' if cfg is None else str(cfg) + ' '}"
                      f"logits {'ok' if ok else 'FAIL'} top1 {'ok' if ok_top else 'FAIL'}")
    failures += check_shared(device, gen, cases)
    if device.startswith("cuda"):
        for path in PATH_KEYS:
            vocab, G, d, n, k = 128256, 501, 4096, 8, 32
            N = math.ceil(vocab / G)
            w = torch.randn(N * G, d, device=device, dtype=torch.bfloat16)
            rows = torch.randperm(N * G, device=device)
            h = torch.randn(n, d, device=device, dtype=torch.bfloat16)
            gi = torch.randint(0, N, (n, k), device=device)
            ov = torch.empty(n, device=device)
            ot = torch.empty(n, dtype=torch.int64, device=device)
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                glh.grouped_top1_triton(h, w, rows, gi, G, 1.0, ov, ot, path=path)
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                glh.grouped_top1_triton(h, w, rows, gi, G, 1.0, ov, ot, path=path)
            ok = True
            for _ in range(3):   # new inputs in the captured buffers, replay
                gi.copy_(torch.randint(0, N, (n, k), device=device))
                h.copy_(torch.randn(n, d, device=device))
                ov.fill_(float("nan"))
                ot.fill_(-7777)
                graph.replay()
                torch.cuda.synchronize()
                ref, ref_tok = grouped_logits_torch(h.double(), w.double(), rows, gi, G)
                rmax = ref.max(1).values
                ok &= bool(((ov.double() - rmax).abs() <= 1e-2 * rmax.abs().clamp(min=1)).all())
                picked = ref.gather(1, (ref_tok == ot[:, None]).float().argmax(1, keepdim=True))
                ok &= bool(((picked.squeeze(1) - rmax).abs()
                            <= 1e-2 * rmax.abs().clamp(min=1)).all())
            print(f"CUDA graph capture + 3 replays, {path}: {'ok' if ok else 'FAIL'}")
            if not ok:
                failures.append(("graph", path))
    print("CHECK", "PASSED" if not failures else f"FAILED: {failures}")
    return 0 if not failures else 1


def check_shared(device, gen, cases):
    """The batch-shared kernel against its reference in float64: n tokens over one list
    of k groups (the ragged last one included); returns the failing cases."""
    import torch
    from coral_vllm.head.shared_lm_head import shared_logits_torch
    from coral_vllm.kernels.shared_lm_head import shared_logits_triton, shared_top1_triton
    failures = []
    for vocab, G, d, n, k in cases:
        N = math.ceil(vocab / G)
        for dtype in (torch.float32, torch.bfloat16):
            w = torch.randn(N * G, d, generator=gen).to(dtype)
            w[vocab:] = 0
            rows = torch.full((N * G,), -1, dtype=torch.int64)
            rows[:vocab] = torch.randperm(vocab, generator=gen)
            groups = torch.randperm(N, generator=gen)[:k]
            groups[0] = N - 1
            hidden = torch.randn(n, d, generator=gen)
            ref, ref_tok = shared_logits_torch(hidden.to(dtype).double(), w.double(), rows,
                                               groups, G, 0.5)
            h, wd, rt, gi = (t.to(device) for t in (hidden, w, rows, groups))
            tol = 1e-4 if dtype == torch.float32 else 1e-2
            fin = torch.isfinite(ref)
            mag = float(ref[fin].abs().max().clamp(min=1))
            L, T = shared_logits_triton(h, wd, rt, gi, G, 0.5)
            L = L.cpu().double()
            ok = (torch.equal(T.cpu(), ref_tok) and torch.equal(L.isinf(), ref.isinf())
                  and float((L[fin] - ref[fin]).abs().max()) <= tol * mag)
            v, t = shared_top1_triton(h, wd, rt, gi, G, 0.5)
            rmax = ref.max(1).values
            ok &= bool(((v.cpu().double() - rmax).abs() <= tol * mag).all())
            for i, tok in enumerate(t.cpu().tolist()):
                cols = ref_tok == tok
                ok &= bool(cols.any()) and float(rmax[i] - ref[i][cols].max()) <= tol * mag
            print(f"V={vocab} G={G} d={d} n={n} k={k} {str(dtype):15s} shared    "
                  f"logits + top1 {'ok' if ok else 'FAIL'}")
            if not ok:
                failures.append((vocab, G, d, n, k, str(dtype), "shared"))
    return failures


def main(argv=None):
    args = parse_args(argv)
    if args.replay:
        return run_replay(args.replay)
    if not args.device.startswith("cuda"):
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.check:
        return run_check(args)
    run_benchmark(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
