"""Repeated, interleaved measurements and the claims they support.

A benchmark cell is measured in rounds. In every round each variant runs once, in an
order rotated from round to round (A B C D, B C D A, ...), so that a drift of the card
(clocks, temperature, a neighbour) falls on all variants alike. Per variant a cell
reports the median over rounds with a distribution-free interval for it; a ratio of two
variants is formed round by round (the two ran back to back) and summarised the same
way. A difference is called only where the interval excludes it: two variants'
intervals do not overlap, or a ratio's interval lies wholly above or below 1.

The interval for the median of n rounds is [x(j), x(n+1-j)] of the sorted values, with
the largest j whose coverage 1 - 2 P(Binomial(n, 1/2) < j) is still at least `LEVEL`
(0.9; exact for any continuous distribution). With 5 rounds that is [min, max], which
covers the median with probability 0.9375; with 10 rounds [x(2), x(9)], 0.979.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Sequence, TypeVar

V = TypeVar("V")
LEVEL = 0.9
MIN_ROUNDS = 5  # the fewest rounds whose [min, max] reaches LEVEL (0.9375)


def rotated(variants: Sequence[V], round_index: int) -> list[V]:
    """The order the variants run in round `round_index` (0-based)."""
    r = round_index % len(variants)
    return list(variants[r:]) + list(variants[:r])


def median_interval(values: Sequence[float], level: float = LEVEL
                    ) -> tuple[float, float, float]:
    """(low, high, coverage): the widest-index order statistics around the median
    whose exact coverage of the true median is at least `level`."""
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        raise ValueError("no values to summarise")

    def coverage(j: int) -> float:  # P(x(j) <= median <= x(n+1-j))
        return 1 - 2 * sum(math.comb(n, i) for i in range(j)) / 2 ** n

    j = 1
    while j + 1 <= (n + 1) // 2 and coverage(j + 1) >= level:
        j += 1
    return xs[j - 1], xs[n - j], coverage(j)


def summarize(values: Sequence[float], digits: int = 3) -> dict[str, Any]:
    """Median, min, max, the interval for the median and its coverage, every value."""
    low, high, cov = median_interval(values)
    r = lambda x: round(x, digits)  # noqa: E731
    return {"median": r(statistics.median(values)), "min": r(min(values)),
            "max": r(max(values)), "interval": [r(low), r(high)],
            "coverage": round(cov, 4), "rounds": len(values),
            "values": [r(v) for v in values]}


def ratio_summary(num: Sequence[float], den: Sequence[float], digits: int = 3
                  ) -> dict[str, Any]:
    """Round-by-round ratios num[i] / den[i], summarised, and the call they support."""
    if len(num) != len(den):
        raise ValueError(f"{len(num)} and {len(den)} rounds: ratios pair rounds")
    s = summarize([a / b for a, b in zip(num, den)], digits)
    s["call"] = ratio_call(s)
    return s


def ratio_call(summary: dict[str, Any]) -> str:
    """'higher' / 'lower' where the ratio's interval lies above / below 1, else 'same'
    (no difference the rounds can tell)."""
    low, high = summary["interval"]
    return "higher" if low > 1 else "lower" if high < 1 else "same"


def differ(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two summaries' intervals are disjoint."""
    return a["interval"][1] < b["interval"][0] or b["interval"][1] < a["interval"][0]


def difference(a: dict[str, Any], b: dict[str, Any]) -> str:
    """'higher' / 'lower' where a's interval lies wholly above / below b's (`differ`), else
    'same': the conservative call a table makes between two variants."""
    if not differ(a, b):
        return "same"
    return "higher" if a["interval"][0] > b["interval"][1] else "lower"


def meets(summary: dict[str, Any], bar: float) -> str:
    """A target of the form 'ratio >= bar': 'met' if the whole interval clears it,
    'missed' if it lies wholly below, else 'undecided' (more rounds would tell)."""
    low, high = summary["interval"]
    return "met" if low >= bar else "missed" if high < bar else "undecided"
