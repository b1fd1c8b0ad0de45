"""Statistics that check speculative decoding left the target's sampling distribution alone.

Draw many short continuations of one prompt with and without speculation and compare
the per-position token distributions. The long tail is binned ("other") so that the
statistic's sampling noise stays small next to the shifts it must catch; the yardstick is
always the same statistic between two independent plain runs.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

POSITIONS = 3
TOP_BINS = 8


def token_marginals(seqs: Sequence[Sequence[int]], positions: int = POSITIONS) -> list[Counter]:
    return [Counter(s[i] for s in seqs if len(s) > i) for i in range(positions)]


def binned_tv(sample: list[Counter], reference: list[Counter], top_bins: int = TOP_BINS) -> float:
    """Total variation, summed over positions, on the reference's top tokens + "other"."""
    out = 0.0
    for cs, cr in zip(sample, reference):
        bins = [t for t, _ in cr.most_common(top_bins)]
        ns, nr = sum(cs.values()), sum(cr.values())
        ps = [cs[t] / ns for t in bins]
        pr = [cr[t] / nr for t in bins]
        ps.append(1 - sum(ps))
        pr.append(1 - sum(pr))
        out += 0.5 * sum(abs(x - y) for x, y in zip(ps, pr))
    return out


def noise_bound(plain_a: list[Counter], plain_b: list[Counter], floor: float = 0.1) -> float:
    """Twice the plain-vs-plain statistic (sampling noise), at least `floor`."""
    return max(2.0 * binned_tv(plain_b, plain_a), floor)
