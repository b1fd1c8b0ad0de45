"""Distillation loss of drafter training (`chunked_soft_ce`): the torch path vs the
soft_ce Triton kernels, timed and checked.

GPU run:

    coral-vllm bench soft-ce --out $OUT/soft_ce.json    # benchmark (5 rounds a shape)
    coral-vllm bench soft-ce --check                    # the two paths agree

CPU smoke test of the same logic (Triton interpreter, tiny shapes):

    coral-vllm bench soft-ce --device cpu --tiny --out /tmp/b/soft_ce.json

What is measured, per head shape (d, V) of `SHAPES` (`shapes.HEAD_SHAPES`): forward and
backward of `chunked_soft_ce` over --tokens positions (default 32768, a 32k-token batch
with every position counted) x --steps drafting steps (default 3), bf16 features and
head as in training, default chunk (`losses.default_chunk`) unless --chunk, through
`impl="torch"` (torch_ms) and `impl="triton"` (triton_ms). Every variant is warmed up
once (compiles the kernels; its peak memory is recorded then), then timed in --rounds
rounds in a rotated order (`rounds.py`), each measurement --reps calls between CUDA
events; a row holds each variant's median ms per call and the round-paired speedup
torch_ms / triton_ms with its interval. Logits: features ~ N(0, 4^2) per coordinate and
head rows ~ N(0, 1/d), so logits are ~ N(0, 16) like a trained head's order of
magnitude; drafter features are the target's plus noise (0.5, 1, 2 per step).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

from coral_vllm.bench.args import bench_parser
from coral_vllm.bench.results import write_json
from coral_vllm.bench.rounds import add_rounds_args, compare, fmt, measure_rounds, ratio_of
from coral_vllm.bench.shapes import HEAD_SHAPES
from coral_vllm.runtime.device import device_name

SHAPES = ("smollm2-135m", "qwen2.5-1.5b", "llama-3.1-8b")
TINY_SHAPE = {"tiny": (32, 1000)}
TINY_TOKENS, TINY_CHUNK = 40, 16   # three chunks, the last one ragged
VARIANTS = {"torch_ms": "torch", "triton_ms": "triton"}
SPEEDUPS = {"speedup": ("torch_ms", "triton_ms")}
STEP_NOISE = (0.5, 1.0, 2.0)       # drafter features = target's + noise, per step
FEATURE_STD = 4.0
STEP_WEIGHT_DECAY = 0.8            # the loss summed over steps with weights 0.8^j


def parse_args(argv: list[str] | None = None):
    p = bench_parser("soft-ce", __doc__, target=False)
    p.add_argument("--out", default="benchmarks/results/soft_ce.json", help="result JSON")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny)")
    p.add_argument("--tiny", action="store_true",
                   help="a tiny shape, for a CPU/interpreter smoke test of the script")
    p.add_argument("--check", action="store_true",
                   help="check that the two paths agree at a real shape (PASS/FAIL, exit "
                        "1 on a failure) instead of the benchmark")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=sorted(HEAD_SHAPES),
                   help=f"head shapes to time (default {' '.join(SHAPES)})")
    p.add_argument("--tokens", type=int, default=32768, help="positions N (default 32768)")
    p.add_argument("--steps", type=int, default=3, help="drafting steps (default 3)")
    p.add_argument("--chunk", type=int, default=None,
                   help="rows per chunk (default: losses.default_chunk of the vocabulary)")
    p.add_argument("--reps", type=int, default=3, help="calls per measurement (default 3)")
    p.add_argument("--seed", type=int, default=0)
    add_rounds_args(p, min_seconds=False)
    return p.parse_args(argv)


def make_inputs(d: int, vocab: int, tokens: int, steps: int, dtype, device: str, seed: int):
    """(preds [steps, N, d] requiring grad, target features [N, d], head [V, d]) in
    `dtype` on `device`, drawn as the module docstring says."""
    import torch
    g = torch.Generator().manual_seed(seed)
    head = torch.randn(vocab, d, generator=g) / d ** 0.5
    tgt = FEATURE_STD * torch.randn(tokens, d, generator=g)
    noise = torch.tensor([STEP_NOISE[s % len(STEP_NOISE)] for s in range(steps)])
    preds = tgt + FEATURE_STD * noise.view(-1, 1, 1) * torch.randn(steps, tokens, d,
                                                                   generator=g)
    move = lambda x: x.to(device=device, dtype=dtype)  # noqa: E731
    return move(preds).requires_grad_(True), move(tgt), move(head)


def step_weights(steps: int, device):
    """The steps' weights in the summed loss (as `TrainConfig.step_weight_decay` does)."""
    import torch
    return STEP_WEIGHT_DECAY ** torch.arange(steps, device=device)


def loss_call(preds, tgt, head, chunk: int | None, impl: str
              ) -> Callable[[], tuple[Any, ...]]:
    """One training-step use of the loss: forward, then backward of the step-weighted
    sum into preds.grad (cleared first); returns the forward's outputs."""
    import torch
    from coral_vllm.training.losses import chunked_soft_ce
    weights = step_weights(len(preds), preds.device)

    def call():
        preds.grad = None
        out = chunked_soft_ce(preds, tgt, head, chunk=chunk, impl=impl)
        (out[0] * weights).sum().backward()
        return out
    return call


def time_ms(call: Callable[[], Any], reps: int, cuda: bool) -> float:
    """ms per call over `reps` back-to-back calls (CUDA events on a GPU)."""
    import torch
    if not cuda:
        t0 = time.perf_counter()
        for _ in range(reps):
            call()
        return (time.perf_counter() - t0) * 1e3 / reps
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        call()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def bench_shape(name: str, d: int, vocab: int, args) -> dict[str, Any]:
    """One row: both variants warmed up (peak memory), then timed in rotated rounds."""
    import torch
    from coral_vllm.training.losses import default_chunk
    cuda = args.device.startswith("cuda")
    tokens = TINY_TOKENS if args.tiny else args.tokens
    chunk = args.chunk or (TINY_CHUNK if args.tiny else default_chunk(vocab))
    dtype = torch.float32 if not cuda else torch.bfloat16
    preds, tgt, head = make_inputs(d, vocab, tokens, args.steps, dtype, args.device,
                                   args.seed)
    calls = {key: loss_call(preds, tgt, head, chunk, impl) for key, impl in VARIANTS.items()}
    row: dict[str, Any] = {"shape": name, "d": d, "vocab": vocab, "tokens": tokens,
                           "steps": args.steps, "chunk": chunk, "dtype": str(dtype)}
    for key, call in calls.items():   # warm-up: compiles; the peak of one call
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        call()
        if cuda:
            torch.cuda.synchronize()
            row[key.replace("_ms", "_peak_mib")] = round(
                (torch.cuda.max_memory_allocated() - base) / 2 ** 20, 1)
    runs, _ = measure_rounds(list(calls), lambda key, _: {
        "ms": time_ms(calls[key], args.reps, cuda)}, rounds=args.rounds)
    values = {key: [r["ms"] for r in rs] for key, rs in runs.items()}
    row.update({key: statistics.median(v) for key, v in values.items()})
    row.update(compare(values, SPEEDUPS, digits=4))
    return row


def run_benchmark(args) -> None:
    shapes = TINY_SHAPE if args.tiny else {s: HEAD_SHAPES[s] for s in args.shapes}
    cuda = args.device.startswith("cuda")
    result: dict[str, Any] = {
        "device": device_name() if cuda else "CPU (Triton interpreter)",
        "rounds": args.rounds, "reps": args.reps,
        "timing": "forward + backward of chunked_soft_ce, CUDA events around --reps calls, "
                  "median over rounds" if cuda else
                  "--reps calls per round on the CPU (Triton interpreter: smoke test only)",
        "rows": []}
    out = Path(args.out)
    t_start = time.time()
    for name, (d, vocab) in shapes.items():
        row = bench_shape(name, d, vocab, args)
        result["rows"].append(row)
        write_json(out, result)  # after every shape: a cut-off run keeps its rows
        s = ratio_of(row, "speedup")
        print(f"{name:14s} d={d:5d} V={vocab:6d} N={row['tokens']} x {row['steps']} steps "
              f"chunk {row['chunk']}: torch {row['torch_ms']:.2f} ms  triton "
              f"{row['triton_ms']:.2f} ms  speedup x{fmt(s)}"
              + (f" {s['difference']}" if "difference" in s else "")
              + (f"  peak MiB torch {row['torch_peak_mib']} triton {row['triton_peak_mib']}"
                 if cuda else "") + f"  [{time.time() - t_start:.0f}s]", flush=True)
    print(f"wrote {out}")


# --------------------------------------------------------------------------- check


def compare_paths(label: str, got, ref, *, ce_rtol: float, grad_rel: float,
                  exact_top1: bool) -> bool:
    """Prints and returns whether (ce, agree, top1, grad) `got` agree with `ref`: ce to
    `ce_rtol`, the gradient to `grad_rel` of its norm, agreement and top-1 exactly when
    `exact_top1` (the same logits on both sides), else within 1% of the positions."""
    import torch
    ce, agree, top1, grad = (x.detach().float().cpu() for x in got)
    ce_r, agree_r, top1_r, grad_r = (x.detach().float().cpu() for x in ref)
    ce_err = float(((ce - ce_r).abs() / ce_r.abs().clamp(min=1e-6)).max())
    grad_err = float((grad - grad_r).norm() / grad_r.norm().clamp(min=1e-30))
    top1_diff = int((top1 != top1_r).sum())
    agree_diff = int((agree - agree_r).abs().max())
    n = len(top1)
    top1_ok = (top1_diff == 0 and agree_diff == 0) if exact_top1 else \
        (top1_diff <= 0.01 * n and agree_diff <= 0.01 * n)
    ok = (ce_err <= ce_rtol and grad_err <= grad_rel and top1_ok
          and bool(torch.isfinite(grad).all()))
    print(f"{'PASS' if ok else 'FAIL'} {label}: ce rel err {ce_err:.2e} (<= {ce_rtol:g}), "
          f"grad rel err {grad_err:.2e} (<= {grad_rel:g}), top-1 differs at {top1_diff}, "
          f"agreement by {agree_diff} of {n} positions")
    return ok


def run_check(args) -> int:
    """Both paths at the SmolLM2 head (tiny: the tiny shape): bf16 at --tokens positions,
    kernels vs torch path (the same bf16 logits, so the same argmax); float32 at a few
    hundred positions, kernels vs the plain float32 reference."""
    import torch
    from coral_vllm.training.losses import soft_ce_reference
    if args.tiny:
        name, (d, vocab) = next(iter(TINY_SHAPE.items()))
        tokens, small, chunk = TINY_TOKENS, TINY_TOKENS, TINY_CHUNK
    else:
        name, (d, vocab) = "smollm2-135m", HEAD_SHAPES["smollm2-135m"]
        tokens, small, chunk = min(args.tokens, 8192), 384, args.chunk
    print(f"check at {name} (d={d}, V={vocab}) on {args.device}")

    def outputs(call, preds):
        ce, _, agree, top1 = call()
        return ce, agree, top1, preds.grad.clone()

    oks = []
    preds, tgt, head = make_inputs(d, vocab, tokens, args.steps, torch.bfloat16,
                                   args.device, args.seed)
    got, ref = (outputs(loss_call(preds, tgt, head, chunk, impl), preds)
                for impl in ("triton", "torch"))
    oks.append(compare_paths(f"bf16 N={tokens}: kernels vs torch path", got, ref,
                             ce_rtol=1e-3, grad_rel=2e-2, exact_top1=True))
    preds, tgt, head = make_inputs(d, vocab, small, args.steps, torch.float32,
                                   args.device, args.seed + 1)
    got = outputs(loss_call(preds, tgt, head, chunk, "triton"), preds)
    preds.grad = None
    ce_r, _, agree_r, top1_r = soft_ce_reference(preds, tgt, head)
    (ce_r * step_weights(args.steps, preds.device)).sum().backward()
    oks.append(compare_paths(f"float32 N={small}: kernels vs soft_ce_reference", got,
                             (ce_r, agree_r, top1_r, preds.grad), ce_rtol=1e-4,
                             grad_rel=1e-3, exact_top1=False))
    print("CHECK", "PASSED" if all(oks) else "FAILED")
    return 0 if all(oks) else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.device.startswith("cuda"):
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.check:
        return run_check(args)
    run_benchmark(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
