"""How every benchmark measures a cell: rounds of interleaved variants, generation sized to
last, and the report of medians, intervals, ratios, calls and targets (`stats` has the
arithmetic; this module is the one procedure `bench e2e`, `synthetic` and `lm-head` share).

A cell (a batch size, a concurrency level, a head shape and token count) is measured in
`--rounds` rounds (default `stats.MIN_ROUNDS`); in each, every variant runs once, in the
order `stats.rotated` gives that round, so a drift of the card falls on all variants
alike. Where a measurement is generation (`bench e2e`, `bench synthetic`), its work is
sized so that it lasts `--min-seconds` (default 2 s, GPU runs; 0 for CPU smoke runs): a
pilot pass of every variant, not reported, times one pass, and every measurement of a
round then runs the same number of passes, so every variant of a round does the same work
(the same prompts, which real acceptance depends on); a round whose shortest measurement
still fell short (the pilot ran slower than the rounds) sizes the rounds after it. On a GPU one
pass of a small batch can be short, and one short measurement per cell could not tell a
15% effect from noise (issue 21).

Per cell the report holds each variant's median with its interval (`stats.summarize`),
every ratio of two variants formed round by round (`stats.ratio_summary`), and a call of
a difference only where the two variants' intervals are disjoint (`stats.difference`);
a target is met only where the ratio's whole interval clears it (`stats.meets`).
"""

from __future__ import annotations

import argparse
import math
from typing import Any, Callable, Hashable, Sequence

from coral_vllm.bench.stats import (MIN_ROUNDS, difference, meets, ratio_summary, rotated,
                                    summarize)

MIN_SECONDS = 2.0
PASS_MARGIN = 1.1  # passes sized for 10% over --min-seconds: a pass varies between rounds


def add_rounds_args(p: argparse.ArgumentParser, *, min_seconds: bool = True) -> None:
    """--rounds (alias --repeats, its earlier name in `bench e2e`) and, for generation
    benchmarks, --min-seconds."""
    p.add_argument("--rounds", "--repeats", type=int, default=MIN_ROUNDS, metavar="N",
                   help=f"rounds per cell, variants interleaved in a rotated order; per "
                   f"cell the median and an interval for it (default {MIN_ROUNDS}: "
                   "[min, max], 93.75%% coverage; fewer rounds cover less, see stats.py)")
    if min_seconds:
        p.add_argument("--min-seconds", type=float, default=MIN_SECONDS,
                       help=f"each measurement generates for at least this long, sized "
                       f"by a pilot pass per cell (default {MIN_SECONDS:g}; 0: one pass, "
                       "no pilot, for CPU smoke runs)")


def passes_for(pilot_walls: Sequence[float], min_seconds: float) -> int:
    """Passes per measurement so that the fastest variant's measurement lasts
    `min_seconds` (with `PASS_MARGIN`)."""
    fastest = min(pilot_walls)
    return max(1, math.ceil(PASS_MARGIN * min_seconds / fastest)) if fastest > 0 else 1


def measure_rounds(variants: Sequence[Hashable],
                   measure: Callable[[Any, int], dict[str, Any]], *, rounds: int,
                   min_seconds: float = 0.0) -> tuple[dict[Any, list[dict[str, Any]]], list[int]]:
    """({variant: its measurements in round order}, passes per measurement in each round).
    `measure(variant, passes)` runs one measurement of `passes` passes and returns at
    least its `wall_s` when `min_seconds` > 0: the pilot sizes the passes by it, and a
    round that still fell short (a pilot pass slower than later ones) sizes the rounds
    after it; every variant of a round runs the same passes."""
    passes = 1
    if min_seconds > 0:
        passes = passes_for([measure(v, 1)["wall_s"] for v in variants], min_seconds)
    runs: dict[Any, list[dict[str, Any]]] = {v: [] for v in variants}
    used = []
    for r in range(rounds):
        got = {v: measure(v, passes) for v in rotated(list(variants), r)}
        for v, m in got.items():
            runs[v].append(m)
        used.append(passes)
        if min_seconds > 0:
            passes = max(passes, passes_for([m["wall_s"] / passes for m in got.values()],
                                            min_seconds))
    return runs, used


def median_run(runs: list[dict[str, Any]], key: str = "output_tok_s") -> dict[str, Any]:
    """The round with the median `key`, plus every round's `key` (as `KEY_rounds`) where
    there were several; `compare` reads them back through `rounds_of`."""
    ranked = sorted(runs, key=lambda r: r[key])
    row = dict(ranked[(len(ranked) - 1) // 2])
    if len(runs) > 1:
        row[f"{key}_rounds"] = [r[key] for r in runs]
    return row


def measurement_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A variant's row in a cell: `median_run` of its throughput, and how long its
    shortest measurement ran (`shortest_wall_s`: the --min-seconds check)."""
    return {**median_run(runs), "shortest_wall_s": round(min(r["wall_s"] for r in runs), 3)}


def rounds_of(row: dict[str, Any], key: str = "output_tok_s") -> list[float]:
    """A row's per-round values of `key` (one value if it was measured once)."""
    return row.get(f"{key}_rounds") or [row[key]]


def compare(values: dict[str, Sequence[float]], pairs: dict[str, tuple[str, str]],
            digits: int = 3) -> dict[str, Any]:
    """One cell: for each ratio `name: (numerator, denominator)` whose variants were both
    measured, `name`: the median of the round-paired ratios. Where there were several
    rounds also `intervals`: every variant's summary (`variants`, to `digits` decimals)
    and every ratio's (`ratios`: `call` from the ratio's own interval, `difference`
    from the two variants' intervals, which is the call the table makes)."""
    present = {name: ab for name, ab in pairs.items() if ab[0] in values and ab[1] in values}
    ratios = {name: ratio_summary(values[a], values[b]) for name, (a, b) in present.items()}
    out: dict[str, Any] = {name: s["median"] for name, s in ratios.items()}
    if max(map(len, values.values()), default=1) > 1:
        variants = {v: summarize(x, digits) for v, x in values.items()}
        for name, (a, b) in present.items():
            ratios[name]["difference"] = difference(variants[a], variants[b])
        out["intervals"] = {"variants": variants, "ratios": ratios}
    return out


def ratio_of(cell: dict[str, Any], name: str) -> dict[str, Any]:
    """The summary of ratio `name` in a cell from `compare` (one round: that value)."""
    if "intervals" in cell:
        return cell["intervals"]["ratios"][name]
    return summarize([cell[name]])


def target(text: str, cell: dict[str, Any], name: str, bar: float) -> dict[str, Any]:
    """A target 'ratio `name` >= bar' on one cell: 'met' only if the ratio's whole
    interval clears the bar (`stats.meets`)."""
    s = ratio_of(cell, name)
    call = meets(s, bar)
    return {"target": text, "measured": cell[name], "interval": s["interval"],
            "coverage": s["coverage"], "call": call, "met": call == "met"}


def every_cell_target(text: str, cells: list[dict[str, Any]], name: str, bar: float,
                      label: Callable[[dict[str, Any]], str]) -> dict[str, Any]:
    """A target 'ratio `name` >= bar in every cell': met if every cell's interval clears
    it, missed if any lies wholly below, else undecided; reports the worst cell (lowest
    median), named by `label`."""
    cells = [c for c in cells if name in c]
    calls = [meets(ratio_of(c, name), bar) for c in cells]
    worst = min(cells, key=lambda c: c[name])
    call = "missed" if "missed" in calls else "met" if set(calls) == {"met"} else "undecided"
    s = ratio_of(worst, name)
    return {"target": f"{text} (worst: {label(worst)})", "measured": worst[name],
            "interval": s["interval"], "coverage": s["coverage"], "call": call,
            "met": call == "met", "cells_met": calls.count("met"), "cells": len(calls)}


def fmt(s: dict[str, Any]) -> str:
    """'median [low, high]' of a summary."""
    def num(x: float) -> str:
        return f"{x:.0f}" if abs(x) >= 1000 else f"{x:.4g}"
    return f"{num(s['median'])} [{num(s['interval'][0])}, {num(s['interval'][1])}]"


def cell_lines(title: str, cell: dict[str, Any], unit: str) -> list[str]:
    """The printed table of one cell from `compare`: each variant's median [interval] in
    `unit`, then each ratio's, with the table's call (and the paired ratio's where it
    alone would call a difference)."""
    if "intervals" not in cell:
        return [f"{title} (one round: no interval)",
                "    " + "  ".join(f"{k} {v}" for k, v in cell.items()
                                   if isinstance(v, float))]
    iv = cell["intervals"]
    some = next(iter(iv["variants"].values()))
    lines = [f"{title} ({some['rounds']} rounds; each interval covers its median with "
             f"{100 * some['coverage']:.2f}%)",
             "    " + "  ".join(f"{v} {fmt(s)}" for v, s in iv["variants"].items())
             + f" {unit}"]
    for name, s in iv["ratios"].items():
        paired = "" if s["call"] == s["difference"] else \
            f" (paired ratio alone: {s['call']})"
        lines.append(f"    {name} {fmt(s)} {s['difference']}{paired}")
    return lines


def target_line(t: dict[str, Any]) -> str:
    """A target as printed: its call, text, measured median and interval."""
    lo, hi = t["interval"]
    return f"{t['call'].upper():9s} {t['target']}: {t['measured']} [{lo}, {hi}]"
