"""Benchmarks of the training module, read from finished runs' metrics and configs.

    throughput  tokens/s of the trainer: the median of a run's logged tokens_per_s after
                the first log row (which holds compilation, caching and warm-up); one
                JSON row per preset, added to an earlier result's rows (`--extend`).
    curve       held-out offline tau against training tokens per preset, from runs'
                evaluation rows, joined with vLLM's tau of the exported best drafters
                (`train vllm-tau` output); JSON + PNG.
    scaling     tokens/s per GPU count (runs of the same global batch under torchrun),
                scaling efficiency, held-out tau after the same steps; JSON + PNG.
    ablation    one row per lever: the best held-out tau of a run, the tokens it took,
                and the settings by which the run differs from the first (the baseline),
                read from the runs' configs, so a row says what was changed.

    coral-vllm bench training throughput --runs eagle=RUN hass=RUN coral=RUN \\
        --extend benchmarks/results/train_throughput.json --out (same file)
    coral-vllm bench training curve --runs eagle=RUN hass=RUN coral=RUN \\
        --vllm-tau tau.json --out benchmarks/results/learning_curve.json
    coral-vllm bench training ablation --runs base=RUN depth2=RUN ... \\
        --vllm-tau tau.json --out benchmarks/results/ablation.json

Tokens are all real (non-padding) tokens of the batches a step trains on, prompt tokens
included.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

from coral_vllm.bench.plots import plot_file
from coral_vllm.bench.results import write_json
from coral_vllm.data.shards import read_manifest
from coral_vllm.named_paths import parse_named
from coral_vllm.training.config import RESUMABLE_CHANGES
from coral_vllm.training.run_dir import CONFIG_FILE, METRICS_FILE


def run_metrics(run: str | Path) -> list[dict[str, Any]]:
    path = Path(run) / METRICS_FILE
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def run_evals(run: str | Path) -> list[dict[str, Any]]:
    """A run's validation rows, in order."""
    return [r["eval"] for r in run_metrics(run) if "eval" in r]


def vllm_tau_rows(path: str | None) -> dict[str, dict[str, Any]]:
    """`train vllm-tau` output by drafter name ({} without one)."""
    if not path:
        return {}
    return {r["drafter"]: r for r in json.loads(Path(path).read_text())["rows"]}


def run_device(run: str | Path, fallback: str | None) -> str:
    """The card a run trained on (its metrics' first row), else `fallback` (runs from
    before the trainer recorded it; --device)."""
    found = next((r["run"]["device"] for r in run_metrics(run) if "run" in r), None)
    if found is None and fallback is None:
        raise SystemExit(f"{run}: its metrics do not name the card; pass --device")
    return found or fallback


def one_device(runs: Sequence[str | Path], fallback: str | None) -> str:
    """The one card all `runs` trained on (a table mixes no cards)."""
    devices = {run_device(run, fallback) for run in runs}
    if len(devices) != 1:
        raise SystemExit(f"runs from {sorted(devices)}: one card per table")
    return devices.pop()


def serving_tau_key(run: str | Path) -> str:
    """The tau a run is judged by: router on for presets that serve with it."""
    cfg = json.loads((Path(run) / CONFIG_FILE).read_text())
    return "tau_router" if cfg["serve_router"] else "tau_dense"


def steady_tokens_per_s(run: str | Path) -> float:
    rows = [r["tokens_per_s"] for r in run_metrics(run) if "tokens_per_s" in r]
    if len(rows) < 2:
        raise ValueError(f"{run}: fewer than two logged steps; train longer")
    return statistics.median(rows[1:])


def throughput(args: argparse.Namespace) -> dict[str, Any]:
    """A row per --runs preset, added to --extend's rows (so that runs measured in
    different commands on the same card make one table)."""
    prior = json.loads(Path(args.extend).read_text()) if args.extend else {"rows": []}
    rows = list(prior["rows"])
    devices = set()
    for preset, run in parse_named(args.runs, "--runs", "RUN").items():
        devices.add(run_device(run, args.device))
        cfg = json.loads((Path(run) / CONFIG_FILE).read_text())
        rows.append({"preset": preset, "version": "after",
                     "tokens_per_s": steady_tokens_per_s(run),
                     "measured": f"median logged rate of {run} (batch_tokens "
                                 f"{cfg['batch_tokens']}, max_len {cfg['max_len']})"})
        print(json.dumps(rows[-1]), flush=True)
    if args.extend:
        devices.add(prior["device"])
    if len(devices) != 1:
        raise SystemExit(f"rows from {sorted(devices)}: one card per table")
    return {"device": devices.pop(), "rows": rows}


def curve(args: argparse.Namespace) -> dict[str, Any]:
    runs = parse_named(args.runs, "--runs", "RUN")
    vllm = vllm_tau_rows(args.vllm_tau)
    rows = []
    device = one_device(list(runs.values()), args.device)
    for preset, run in runs.items():
        key = serving_tau_key(run)
        evals = run_evals(run)
        best = max(evals, key=lambda e: e[key]) if evals else None
        for e in evals:
            row = {"preset": preset, "step": e["step"], "train_tokens": e["train_tokens"],
                   "heldout_tau": e[key], "heldout_tau_dense": e["tau_dense"],
                   "heldout_tau_router": e["tau_router"],
                   "heldout_acc1": e.get("heldout_acc1"), "vllm_tau": None}
            if e is best and preset in vllm:
                row["vllm_tau"] = vllm[preset]["vllm_tau"]
            rows.append(row)
    return {"device": device, "k": args.k, "serving_head": "router for coral, dense "
            "for eagle/hass", "rows": rows}


def scaling(args: argparse.Namespace) -> dict[str, Any]:
    """tokens/s per GPU count (runs named by their GPU count), efficiency against the
    smallest count, and the held-out tau each reached after the same steps."""
    runs = {int(n): r for n, r in parse_named(args.runs, "--runs", "RUN").items()}
    device = one_device(list(runs.values()), args.device)
    base = min(runs)
    rate = {n: steady_tokens_per_s(r) for n, r in runs.items()}
    rows = []
    for n, run in sorted(runs.items()):
        key = serving_tau_key(run)
        evals = run_evals(run)
        rows.append({"gpus": n, "tokens_per_s": rate[n],
                     "scaling_efficiency": rate[n] * base / (n * rate[base]),
                     "heldout_tau": evals[-1][key] if evals else None,
                     "train_tokens": evals[-1]["train_tokens"] if evals else None})
    return {"device": device, "rows": rows}


# settings that say where a run lives or how it is logged, not what it trains (the data
# a run reads is compared by what its manifest says, not by its path)
_NOT_A_LEVER = RESUMABLE_CHANGES | {"init_from"}


def data_summary(run: str | Path) -> dict[str, Any]:
    """What a run's data is: its looping replies' handling and size (from the manifest)."""
    cfg = json.loads((Path(run) / CONFIG_FILE).read_text())
    try:
        m = read_manifest(cfg["data"])
    except FileNotFoundError:
        return {}
    return {"loops": m.get("cuts", {}).get("loops", "trim"), "samples": m.get("samples"),
            "tokens": m.get("tokens"), "complete": m.get("complete", True)}


def ablation(args: argparse.Namespace) -> dict[str, Any]:
    """Per run: the best held-out tau and the tau at its last evaluation up to the last
    step every run reached (runs cut short by a time limit compare there; None if it has
    none), with the settings (and data) that differ from the first run."""
    runs = parse_named(args.runs, "--runs", "RUN")
    vllm = vllm_tau_rows(args.vllm_tau)
    device = one_device(list(runs.values()), args.device)
    configs = {name: json.loads((Path(run) / CONFIG_FILE).read_text())
               for name, run in runs.items()}
    data = {name: data_summary(run) for name, run in runs.items()}
    evals = {name: run_evals(run) for name, run in runs.items()}
    for name, rows_ in evals.items():
        if not rows_:
            raise SystemExit(f"--runs {name}={runs[name]}: no evaluation rows; train with "
                             "--eval-every")
    common = min(max(e["step"] for e in rows_) for rows_ in evals.values())
    base_name = next(iter(runs))
    base = configs[base_name]
    rows = []
    for name, run in runs.items():
        key = serving_tau_key(run)
        best = max(evals[name], key=lambda e: e[key])
        upto = [e for e in evals[name] if e["step"] <= common]
        changed = {k: v for k, v in configs[name].items()
                   if k not in _NOT_A_LEVER and base.get(k) != v}
        if data[name] != data[base_name]:
            changed["data"] = data[name]
        rows.append({"lever": name, "changed": changed, "heldout_tau": best[key],
                     "heldout_acc1": best.get("heldout_acc1"),
                     "tokens_at_best": best["train_tokens"],
                     "train_tokens": evals[name][-1]["train_tokens"],
                     "heldout_tau_at_common_step": upto[-1][key] if upto else None,
                     "vllm_tau": vllm.get(name, {}).get("vllm_tau"),
                     "ratio_to_baseline": None})
    for row in rows:
        row["ratio_to_baseline"] = row["heldout_tau"] / rows[0]["heldout_tau"]
    return {"device": device, "baseline": base_name, "k": args.k, "common_step": common,
            "data": data[base_name], "rows": rows}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="coral-vllm bench training", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("throughput", help="trainer tokens/s per preset, from finished runs")
    t.add_argument("--runs", nargs="+", required=True, metavar="PRESET=RUN",
                   help="finished runs")
    t.add_argument("--extend", help="an earlier result of this command to add rows to")
    t.add_argument("--device", help="the card, for runs whose metrics do not record it")
    t.add_argument("--out", required=True)
    c = sub.add_parser("curve", help="held-out tau vs training tokens, + vLLM's tau")
    c.add_argument("--runs", nargs="+", required=True, metavar="PRESET=RUN")
    c.add_argument("--vllm-tau", help="JSON from `coral-vllm train vllm-tau`")
    c.add_argument("-k", type=int, default=5)
    c.add_argument("--device", help="the card, for runs whose metrics do not record it")
    c.add_argument("--out", required=True)
    g = sub.add_parser("scaling", help="tokens/s and held-out tau per GPU count")
    g.add_argument("--runs", nargs="+", required=True, metavar="GPUS=RUN")
    g.add_argument("--device", help="the card, for runs whose metrics do not record it")
    g.add_argument("--out", required=True)
    a = sub.add_parser("ablation", help="best held-out tau per lever, vs the first run")
    a.add_argument("--runs", nargs="+", required=True, metavar="LEVER=RUN",
                   help="the baseline first; every run trained on the same data and budget")
    a.add_argument("--vllm-tau", help="JSON from `coral-vllm train vllm-tau`")
    a.add_argument("-k", type=int, default=5)
    a.add_argument("--device", help="the card, for runs whose metrics do not record it")
    a.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    result = {"throughput": throughput, "curve": curve, "scaling": scaling,
              "ablation": ablation}[args.cmd](args)
    out = Path(args.out)
    write_json(out, result)
    if args.cmd in ("curve", "scaling"):
        print(plot_file(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
